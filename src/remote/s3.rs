//! The `s3://` backend.

use crate::config::S3Url;

use super::{RemoteError, RemoteResult};

#[derive(Debug)]
pub struct S3Remote;

impl S3Remote {
    pub async fn new(name: &str, _url: &S3Url) -> RemoteResult<Self> {
        Err(RemoteError::Other {
            remote: name.to_owned(),
            detail: "s3:// remotes are not supported by this build of podfs yet".into(),
        })
    }
}
