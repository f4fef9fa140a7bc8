//! The `oras://` backend.

use crate::config::OrasUrl;

use super::{RemoteError, RemoteResult};

#[derive(Debug)]
pub struct OrasRemote;

impl OrasRemote {
    pub fn new(name: &str, _url: &OrasUrl) -> RemoteResult<Self> {
        Err(RemoteError::Other {
            remote: name.to_owned(),
            detail: "oras:// remotes are not supported by this build of podfs yet".into(),
        })
    }
}
