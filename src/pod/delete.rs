//! Deleting one version, or a whole pod, with reference-aware cleanup of state objects.
//!
//! The version object goes first (so the version disappears at once and atomically); then every
//! state object it referred to that no remaining version refers to. A state object still used by
//! another version is kept, so every remaining version stays loadable.

use std::collections::BTreeSet;

use super::read::{pick_version, read_info, versions_of};
use super::{PodName, PodResult};
use crate::remote::Remote;

/// What a delete removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub versions: Vec<u64>,
    pub states_removed: Vec<u64>,
    pub states_kept: Vec<u64>,
}

/// Deletes version `version` of `pod`, or the whole pod when `version` is `None`.
pub async fn delete(
    remote: &dyn Remote,
    pod: &PodName,
    version: Option<u64>,
) -> PodResult<DeleteOutcome> {
    match version {
        Some(v) => delete_version(remote, pod, v).await,
        None => delete_pod(remote, pod).await,
    }
}

async fn delete_version(
    remote: &dyn Remote,
    pod: &PodName,
    version: u64,
) -> PodResult<DeleteOutcome> {
    let versions = versions_of(remote, pod).await?;
    let version = pick_version(remote, pod, &versions, Some(version))?;
    let doomed = read_info(remote, pod, version).await?;
    let mut still_used = BTreeSet::new();
    for &v in versions.iter().filter(|&&v| v != version) {
        still_used.extend(read_info(remote, pod, v).await?.states);
    }
    remote.delete_version(pod, version).await?;
    let mut out = DeleteOutcome {
        versions: vec![version],
        ..Default::default()
    };
    for &s in &doomed.states {
        if still_used.contains(&s) {
            out.states_kept.push(s);
        } else {
            remote.delete_state(pod, s).await?;
            out.states_removed.push(s);
        }
    }
    Ok(out)
}

async fn delete_pod(remote: &dyn Remote, pod: &PodName) -> PodResult<DeleteOutcome> {
    let versions = versions_of(remote, pod).await?;
    // Newest first: an interrupted delete leaves a shorter history, never a gap at the start.
    for &v in versions.iter().rev() {
        remote.delete_version(pod, v).await?;
    }
    let states = remote.list_states(pod).await?;
    for &s in &states {
        remote.delete_state(pod, s).await?;
    }
    Ok(DeleteOutcome {
        versions,
        states_removed: states,
        states_kept: Vec::new(),
    })
}
