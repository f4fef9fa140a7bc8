//! The remotes a mount shows at its root: a fixed list, or the configuration (`podfs remote
//! add/delete`), read again at most once per refresh when the root is looked at.
//!
//! Each remote gets a slot whose index is its `Node::Remote` number, never reused: a remote
//! deleted from the configuration empties its slot (its inodes answer `ENOENT`), and one whose
//! URL changed is a new slot, so no cached pod or block of the old one is shown under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::lock;
use crate::remote::Remote;

/// Where a mount that follows the configuration gets its remotes.
#[async_trait]
pub trait RemoteSource: Send + Sync {
    /// The remotes configured now, in order: name and URL template (placeholders unresolved,
    /// so no secret), or why the configuration cannot be read.
    fn configured(&self) -> Result<Vec<(String, String)>, String>;

    /// Opens remote `name` as configured now, or says why it cannot be used.
    async fn open(&self, name: &str) -> Result<Arc<dyn Remote>, String>;
}

#[derive(Debug)]
struct Slot {
    name: String,
    /// The URL template it was opened from (empty for a fixed remote).
    template: String,
    /// `None` once deleted from the configuration.
    remote: Option<Arc<dyn Remote>>,
}

/// The remotes of a mount.
pub(super) struct RemoteTable {
    source: Option<Arc<dyn RemoteSource>>,
    slots: Mutex<Vec<Slot>>,
    /// When the configuration was last read.
    checked: Mutex<Option<Instant>>,
    /// Remotes that could not be opened, with the template that failed: not tried again (nor
    /// logged again) until their configuration changes.
    failed: Mutex<HashMap<String, String>>,
    /// One reading of the configuration at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RemoteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTable")
            .field("slots", &*lock(&self.slots))
            .finish_non_exhaustive()
    }
}

impl RemoteTable {
    /// Exactly `remotes`, for the life of the mount.
    pub fn fixed(remotes: Vec<(String, Arc<dyn Remote>)>) -> Self {
        let slots = remotes
            .into_iter()
            .map(|(name, r)| Slot {
                name,
                template: String::new(),
                remote: Some(r),
            })
            .collect();
        Self {
            source: None,
            slots: Mutex::new(slots),
            checked: Mutex::new(None),
            failed: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The remotes `source` configures, read at the first [`refresh`](Self::refresh).
    pub fn following(source: Arc<dyn RemoteSource>) -> Self {
        let mut t = Self::fixed(Vec::new());
        t.source = Some(source);
        t
    }

    /// Remote `r` with its name, unless deleted.
    pub fn get(&self, r: usize) -> Option<(String, Arc<dyn Remote>)> {
        let slots = lock(&self.slots);
        let s = slots.get(r)?;
        Some((s.name.clone(), Arc::clone(s.remote.as_ref()?)))
    }

    /// The remotes shown now: slot number and name, in order.
    pub fn live(&self) -> Vec<(usize, String)> {
        lock(&self.slots)
            .iter()
            .enumerate()
            .filter(|(_, s)| s.remote.is_some())
            .map(|(i, s)| (i, s.name.clone()))
            .collect()
    }

    /// The slot of the remote shown as `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        lock(&self.slots)
            .iter()
            .position(|s| s.remote.is_some() && s.name == name)
    }

    /// Reads the configuration again if it was last read `every` ago or more: opens remotes
    /// added (or changed), empties the slots of those deleted (or changed). Returns the names
    /// no longer shown as they were, for the kernel to forget.
    pub async fn refresh(&self, every: Duration) -> Vec<String> {
        let Some(source) = &self.source else {
            return Vec::new();
        };
        let fresh = |c: &Option<Instant>| c.is_some_and(|at| at.elapsed() < every);
        if fresh(&lock(&self.checked)) {
            return Vec::new();
        }
        let _one = self.refreshing.lock().await;
        if fresh(&lock(&self.checked)) {
            return Vec::new();
        }
        let configured = match source.configured() {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!("keeping the remotes shown: {why}");
                *lock(&self.checked) = Some(Instant::now());
                return Vec::new();
            }
        };
        let mut gone = Vec::new();
        for s in lock(&self.slots).iter_mut() {
            let still = configured
                .iter()
                .any(|(n, t)| *n == s.name && *t == s.template);
            if s.remote.is_some() && !still {
                tracing::info!(remote = %s.name, "remote {} left the configuration", s.name);
                s.remote = None;
                gone.push(s.name.clone());
            }
        }
        lock(&self.failed).retain(|n, t| configured.iter().any(|(cn, ct)| cn == n && ct == t));
        for (name, template) in configured {
            if self.find(&name).is_some() || lock(&self.failed).get(&name) == Some(&template) {
                continue;
            }
            match source.open(&name).await {
                Ok(remote) => {
                    tracing::info!(remote = %name, "showing remote {name}");
                    lock(&self.slots).push(Slot {
                        name,
                        template,
                        remote: Some(remote),
                    });
                }
                Err(why) => {
                    tracing::warn!(remote = %name, "left out remote {name}: {why}");
                    lock(&self.failed).insert(name, template);
                }
            }
        }
        *lock(&self.checked) = Some(Instant::now());
        gone
    }
}
