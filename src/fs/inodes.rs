//! Inode numbers: what each one stands for, handed out on first sight and freed when the kernel
//! forgets the last reference it holds (FUSE `forget`), so the table follows what the kernel
//! caches, not every path ever visited.

use std::collections::HashMap;

use crate::name::PodName;

/// The inode of the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// What an inode stands for. Remotes are indexes into the mount's remote table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Node {
    Root,
    Remote(usize),
    /// `REMOTE/POD/`: the latest version's root, whichever that is now.
    Pod(usize, PodName),
    /// `POD/.versions/`.
    Versions(usize, PodName),
    /// `POD/.versions/latest`.
    LatestLink(usize, PodName),
    /// `path` of `version` (`""`: the version's root, `.versions/N/`), as the pod was in
    /// `generation`: a pod deleted and saved again is a new generation, so its reused version
    /// numbers get new inodes (docs/SEMANTICS.md, *Identity*).
    Path {
        remote: usize,
        pod: PodName,
        generation: u64,
        version: u64,
        path: String,
    },
    /// An object of `POD/`'s working tree (src/fs/workspace.rs): it keeps its inode through
    /// renames, and its attributes and bytes change as it is written.
    Live {
        remote: usize,
        pod: PodName,
        obj: u64,
    },
}

#[derive(Debug)]
struct Slot {
    node: Node,
    /// References the kernel holds: one per `lookup` or `readdirplus` entry, less what it forgot.
    lookups: u64,
}

/// The inodes of a mount. An inode the kernel never got from a lookup (one only listed by a
/// plain `readdir`) has no references and lives as long as the mount.
#[derive(Debug)]
pub(super) struct InodeTable {
    next: u64,
    by_ino: HashMap<u64, Slot>,
    by_node: HashMap<Node, u64>,
}

impl InodeTable {
    pub fn new() -> Self {
        let mut t = Self {
            next: ROOT_INO,
            by_ino: HashMap::new(),
            by_node: HashMap::new(),
        };
        t.ino(Node::Root);
        t
    }

    /// The inode of `node`, new if it has none.
    pub fn ino(&mut self, node: Node) -> u64 {
        if let Some(&ino) = self.by_node.get(&node) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(ino, Slot { node, lookups: 0 });
        ino
    }

    /// The inode of `node`, if it has one.
    pub fn find(&self, node: &Node) -> Option<u64> {
        self.by_node.get(node).copied()
    }

    /// The inode of `node`, with one more kernel reference.
    pub fn looked_up(&mut self, node: Node) -> u64 {
        let ino = self.ino(node);
        if let Some(slot) = self.by_ino.get_mut(&ino) {
            slot.lookups += 1;
        }
        ino
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.by_ino.get(&ino).map(|s| s.node.clone())
    }

    /// The kernel dropped `n` references to `ino`; the last one frees it (never the root).
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(slot) = self.by_ino.get_mut(&ino) else {
            return;
        };
        slot.lookups = slot.lookups.saturating_sub(n);
        if slot.lookups == 0
            && let Some(slot) = self.by_ino.remove(&ino)
        {
            self.by_node.remove(&slot.node);
        }
    }

    /// The inodes of `pod`'s working tree on remote `r`: its root (`None`) and its objects.
    pub fn of_working_tree(&self, r: usize, pod: &PodName) -> Vec<(u64, Option<u64>)> {
        self.by_node
            .iter()
            .filter_map(|(node, &ino)| match node {
                Node::Pod(nr, p) if *nr == r && p == pod => Some((ino, None)),
                Node::Live {
                    remote,
                    pod: p,
                    obj,
                } if *remote == r && p == pod => Some((ino, Some(*obj))),
                _ => None,
            })
            .collect()
    }

    /// Inodes in the table.
    pub fn len(&self) -> usize {
        self.by_ino.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_inodes_are_freed_and_not_reused_for_other_nodes() {
        let mut t = InodeTable::new();
        let pod = PodName::new("p").unwrap();
        let a = t.looked_up(Node::Pod(0, pod.clone()));
        assert_eq!(t.looked_up(Node::Pod(0, pod.clone())), a);
        t.forget(a, 1);
        assert_eq!(
            t.node(a),
            Some(Node::Pod(0, pod.clone())),
            "one reference left"
        );
        t.forget(a, 1);
        assert_eq!(t.node(a), None);
        let b = t.looked_up(Node::Pod(0, pod));
        assert_ne!(a, b, "a number is never handed out twice");
        t.forget(ROOT_INO, 10);
        assert_eq!(t.node(ROOT_INO), Some(Node::Root));
        assert_eq!(t.len(), 2);
    }
}
