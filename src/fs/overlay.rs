//! A pod's working tree as a mount shows it under `POD/`: a committed version (the base) with
//! the changes staged on top of it, per path ([`Op`]s, replayed from the journal after a crash).
//!
//! The delta maps a path to what it is now (`Some`) or to nothing (`None`, a path of the base
//! that is gone). A path exists exactly when its parent does: operations remove a directory's
//! contents before the directory (`rmdir` needs it empty, a rename moves every path below), so a
//! lookup never needs to look at a path's ancestors.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pod::manifest::{Entry, VersionObject};

/// One path of the working tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// As a manifest holds it, at the path where the item is now. A file whose bytes are staged
    /// has no `data`; its `size` and `mtime` follow its data file.
    pub entry: Entry,
    /// The staged data file (`data/ID` in the pod's staging dir) holding the file's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<u64>,
    /// For bytes stored in a committed version (`entry.data`): that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// For bytes stored in a committed version: the identity of the state object holding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_id: Option<String>,
}

impl Item {
    /// Path `entry` of committed version `obj`.
    pub fn committed(obj: &VersionObject, entry: &Entry) -> Self {
        let state_id = entry
            .data
            .as_ref()
            .and_then(|d| obj.state_id(d.state))
            .map(str::to_owned);
        Self {
            entry: entry.clone(),
            staged: None,
            version: entry.data.as_ref().map(|_| obj.info.version),
            state_id,
        }
    }

    pub fn path(&self) -> &str {
        &self.entry.path
    }
}

/// A change to the working tree, as the journal records it. Each one is absolute (it names the
/// result, not a difference), so replaying a journal on the version it started from gives the
/// tree the writers saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The path is now this item (created, or its metadata or data file changed).
    Put(Item),
    /// The path and everything below it are gone.
    Remove(String),
    /// The path and everything below it moved, replacing what was at `to`.
    Rename { from: String, to: String },
    /// Two paths swapped, with everything below them.
    Exchange { a: String, b: String },
}

/// The base version and the staged changes on top of it.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    base: Option<Arc<VersionObject>>,
    delta: BTreeMap<String, Option<Item>>,
}

/// `path` under `to` instead of under `from` (`path` is `from` or below it).
fn moved(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", &path[from.len()..])
}

/// Whether `path` is `dir` or below it.
pub(super) fn within(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Overlay {
    pub fn new(base: Option<Arc<VersionObject>>) -> Self {
        Self {
            base,
            delta: BTreeMap::new(),
        }
    }

    pub fn base(&self) -> Option<&Arc<VersionObject>> {
        self.base.as_ref()
    }

    pub fn base_version(&self) -> Option<u64> {
        self.base.as_ref().map(|b| b.info.version)
    }

    /// The staged changes: path to what it is now, or `None` if gone.
    pub fn delta(&self) -> &BTreeMap<String, Option<Item>> {
        &self.delta
    }

    /// Whether nothing is staged.
    pub fn is_clean(&self) -> bool {
        self.delta.is_empty()
    }

    fn base_item(&self, path: &str) -> Option<Item> {
        let base = self.base.as_ref()?;
        base.manifest.get(path).map(|e| Item::committed(base, e))
    }

    /// What `path` is now (never the pod's root, `""`).
    pub fn get(&self, path: &str) -> Option<Item> {
        match self.delta.get(path) {
            Some(now) => now.clone(),
            None => self.base_item(path),
        }
    }

    /// The items directly in directory `dir` (`""`: the pod's root), sorted by path.
    pub fn children(&self, dir: &str) -> Vec<Item> {
        let mut out: BTreeMap<String, Item> = BTreeMap::new();
        if let Some(base) = &self.base {
            for e in base.manifest.children(dir) {
                if !self.delta.contains_key(&e.path) {
                    out.insert(e.path.clone(), Item::committed(base, e));
                }
            }
        }
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        for (path, now) in self.delta.range(prefix.clone()..) {
            let Some(rest) = path.strip_prefix(&prefix) else {
                break;
            };
            if let (false, Some(item)) = (rest.contains('/'), now) {
                out.insert(path.clone(), item.clone());
            }
        }
        out.into_values().collect()
    }

    /// `path` and everything below it, as they are now, sorted by path.
    pub fn subtree(&self, path: &str) -> Vec<Item> {
        let mut out: BTreeMap<String, Item> = BTreeMap::new();
        if let Some(base) = &self.base {
            let entries = &base.manifest.entries;
            let below = format!("{path}/");
            let from = entries.partition_point(|e| e.path.as_bytes() < path.as_bytes());
            for e in &entries[from..] {
                if e.path != path && !e.path.starts_with(&below) {
                    if e.path.as_bytes() > below.as_bytes() {
                        break;
                    }
                    continue;
                }
                if !self.delta.contains_key(&e.path) {
                    out.insert(e.path.clone(), Item::committed(base, e));
                }
            }
        }
        for (p, now) in self.delta.range(path.to_owned()..) {
            if !p.starts_with(path) {
                break;
            }
            if let (true, Some(item)) = (within(p, path), now) {
                out.insert(p.clone(), item.clone());
            }
        }
        out.into_values().collect()
    }

    /// The whole tree as it is now, sorted by the bytes of the paths.
    pub fn items(&self) -> Vec<Item> {
        let mut out: Vec<Item> = Vec::new();
        if let Some(base) = &self.base {
            for e in &base.manifest.entries {
                if !self.delta.contains_key(&e.path) {
                    out.push(Item::committed(base, e));
                }
            }
        }
        out.extend(self.delta.values().flatten().cloned());
        out.sort_by(|a, b| a.path().as_bytes().cmp(b.path().as_bytes()));
        out
    }

    /// Records that `path` is now `now`; a change back to what the base holds is no change.
    fn set(&mut self, path: String, now: Option<Item>) {
        if now == self.base_item(&path) {
            self.delta.remove(&path);
        } else {
            self.delta.insert(path, now);
        }
    }

    /// Applies `op`. The caller has checked it (a rename's target is a file or an empty
    /// directory, a removed directory is empty); replaying a journal applies ops as recorded.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Put(item) => self.set(item.entry.path.clone(), Some(item.clone())),
            Op::Remove(path) => {
                for item in self.subtree(path) {
                    self.set(item.entry.path, None);
                }
            }
            Op::Rename { from, to } => {
                if from == to {
                    return;
                }
                let moving = self.subtree(from);
                for gone in self.subtree(to).into_iter().chain(moving.iter().cloned()) {
                    self.set(gone.entry.path, None);
                }
                for mut item in moving {
                    item.entry.path = moved(&item.entry.path, from, to);
                    self.set(item.entry.path.clone(), Some(item));
                }
            }
            Op::Exchange { a, b } => {
                let (sa, sb) = (self.subtree(a), self.subtree(b));
                for gone in sa.iter().chain(&sb) {
                    self.set(gone.entry.path.clone(), None);
                }
                for (items, from, to) in [(sa, a, b), (sb, b, a)] {
                    for mut item in items {
                        item.entry.path = moved(&item.entry.path, from, to);
                        self.set(item.entry.path.clone(), Some(item));
                    }
                }
            }
        }
    }

    /// Now that the tree as it was at `saved` is committed as `obj`: `obj` is the new base, and
    /// only what changed since `saved` stays staged.
    pub fn committed(&mut self, obj: Arc<VersionObject>, saved: &BTreeMap<String, Option<Item>>) {
        let now = std::mem::take(&mut self.delta);
        self.base = Some(obj);
        for (path, item) in now {
            if saved.get(&path) != Some(&item) {
                self.set(path, item);
            }
        }
    }

    /// A newer base, with nothing staged (another writer saved the pod).
    pub fn rebase(&mut self, obj: Arc<VersionObject>) {
        debug_assert!(self.delta.is_empty());
        self.base = Some(obj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::manifest::{Kind, Manifest, VersionInfo};

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            mtime: 1,
            mtime_nsec: 0,
            size: 0,
            target: None,
            data: None,
        }
    }

    fn base(paths: &[(&str, Kind)]) -> Arc<VersionObject> {
        let entries = paths.iter().map(|(p, k)| entry(p, *k)).collect();
        Arc::new(VersionObject {
            info: VersionInfo {
                format: 1,
                pod: "p".into(),
                version: 1,
                parent: None,
                created_at: String::new(),
                message: String::new(),
                creator: String::new(),
                tool_version: String::new(),
                file_count: 0,
                logical_bytes: 0,
                stored_bytes: 0,
                states: Vec::new(),
                state_ids: BTreeMap::new(),
            },
            manifest: Manifest::new(entries),
        })
    }

    fn paths(items: &[Item]) -> Vec<&str> {
        items.iter().map(Item::path).collect()
    }

    fn staged(path: &str) -> Item {
        Item {
            entry: entry(path, Kind::File),
            staged: Some(7),
            version: None,
            state_id: None,
        }
    }

    #[test]
    fn a_directory_rename_moves_every_path_below_it_and_back_is_no_change() {
        let b = base(&[
            ("a", Kind::Dir),
            ("a b", Kind::File),
            ("a/x", Kind::File),
            ("a/y", Kind::Dir),
            ("a/y/z", Kind::File),
            ("c", Kind::File),
        ]);
        let mut o = Overlay::new(Some(b));
        o.apply(&Op::Put(staged("a/new")));
        o.apply(&Op::Rename {
            from: "a".into(),
            to: "d".into(),
        });
        assert_eq!(o.get("a"), None);
        assert_eq!(paths(&o.children("")), ["a b", "c", "d"]);
        assert_eq!(
            paths(&o.subtree("d")),
            ["d", "d/new", "d/x", "d/y", "d/y/z"]
        );
        assert_eq!(o.get("d/new").and_then(|i| i.staged), Some(7));
        o.apply(&Op::Remove("d/new".into()));
        o.apply(&Op::Rename {
            from: "d".into(),
            to: "a".into(),
        });
        assert!(o.is_clean(), "{:?}", o.delta());
    }

    #[test]
    fn exchange_swaps_subtrees_and_remove_takes_everything_below() {
        let b = base(&[("a", Kind::Dir), ("a/x", Kind::File), ("b", Kind::File)]);
        let mut o = Overlay::new(Some(b));
        o.apply(&Op::Exchange {
            a: "a".into(),
            b: "b".into(),
        });
        assert_eq!(o.get("a").map(|i| i.entry.kind), Some(Kind::File));
        assert_eq!(paths(&o.subtree("b")), ["b", "b/x"]);
        o.apply(&Op::Remove("b".into()));
        assert_eq!(paths(&o.items()), ["a"]);
    }

    #[test]
    fn a_commit_keeps_staged_only_what_changed_since_the_snapshot() {
        let mut o = Overlay::new(Some(base(&[("a", Kind::File)])));
        o.apply(&Op::Put(staged("x")));
        o.apply(&Op::Put(staged("y")));
        let saved = o.delta().clone();
        let mut later = staged("y");
        later.staged = Some(8);
        o.apply(&Op::Put(later));
        let obj = base(&[("a", Kind::File), ("x", Kind::File), ("y", Kind::File)]);
        o.committed(obj, &saved);
        assert_eq!(o.delta().keys().collect::<Vec<_>>(), ["y"]);
        assert_eq!(o.get("x").and_then(|i| i.staged), None);
    }
}
