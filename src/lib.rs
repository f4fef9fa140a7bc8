//! podfs: versioned snapshots of directory trees ("pods") on S3 buckets, OCI registries and local
//! directories.
//!
//! - [`buffers`]: reused buffers for the bytes of range reads.
//! - [`config`]: the volume dir, `remotes.toml`, remote URL templates and placeholders.
//! - [`name`]: pod names and `POD[:N]` references.
//! - [`remote`]: the pod-level [`remote::Remote`] trait and its backends.
//! - [`pod`]: format v1, save, load, delete.
//! - [`cache`]: the mount's block cache (memory LRU + shared disk directory), verified blocks.
//! - [`fs`]: the FUSE mount: a fuser-free async core, the fuser adapter, mount points.
//! - [`commands`]: the CLI commands, on top of the above.
//! - [`term`]: what reaches a terminal: escaped remote text, one-line error chains.

pub mod buffers;
pub mod cache;
pub mod commands;
pub mod config;
pub mod fs;
pub mod metrics;
pub mod name;
pub mod pod;
pub mod progress;
pub mod remote;
pub mod term;
