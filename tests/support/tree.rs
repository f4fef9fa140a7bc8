//! The one test tree every integration test saves: nested directories, an empty directory, an
//! empty file, an executable, a private file, symlinks (to a file, to a directory, dangling),
//! set mtimes and modes, a few-hundred-KiB incompressible file and an optional large one.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use filetime::FileTime;

pub const MIB: usize = 1 << 20;

/// Size of `dir/medium.bin`: a few hundred KiB, deflated when saved (under the 1 MiB threshold)
/// although incompressible.
pub const MEDIUM: usize = 300 << 10;

/// Writes the test tree under `root` (created if missing); `big > 0` adds `dir/big.bin` with
/// `big` incompressible bytes. Paths:
///
/// ```text
/// hello.txt                  "hello, pods\n", mtime 1600000000.123456789
/// empty-file                 0 bytes
/// empty-dir/                 mtime 1500000000.000000001
/// script.sh                  0755
/// secret                     0600
/// link-to-file -> hello.txt
/// link-to-dir  -> dir/nested
/// dir/medium.bin             MEDIUM pseudo-random bytes
/// dir/big.bin                `big` pseudo-random bytes (only when big > 0)
/// dir/dangling -> ../../nowhere
/// dir/nested/                0750
/// dir/nested/deeper/data.json
/// ```
pub fn make_tree(root: &Path, big: usize) {
    std::fs::create_dir_all(root.join("dir/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("hello.txt"), "hello, pods\n").unwrap();
    std::fs::write(root.join("empty-file"), "").unwrap();
    std::fs::write(root.join("dir/nested/deeper/data.json"), r#"{"a": 1}"#).unwrap();
    std::fs::write(root.join("dir/medium.bin"), noise(MEDIUM, 1)).unwrap();
    if big > 0 {
        std::fs::write(root.join("dir/big.bin"), noise(big, 2)).unwrap();
    }
    std::fs::write(root.join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("script.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(root.join("secret"), "s").unwrap();
    std::fs::set_permissions(root.join("secret"), PermissionsExt::from_mode(0o600)).unwrap();
    symlink("hello.txt", root.join("link-to-file")).unwrap();
    symlink("../../nowhere", root.join("dir/dangling")).unwrap();
    symlink("dir/nested", root.join("link-to-dir")).unwrap();
    filetime::set_file_mtime(
        root.join("hello.txt"),
        FileTime::from_unix_time(1_600_000_000, 123_456_789),
    )
    .unwrap();
    std::fs::set_permissions(root.join("dir/nested"), PermissionsExt::from_mode(0o750)).unwrap();
    filetime::set_file_mtime(
        root.join("empty-dir"),
        FileTime::from_unix_time(1_500_000_000, 1),
    )
    .unwrap();
}

/// Copies the tree `from` to `to` (created if missing) with `cp -a`: modes, mtimes, symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// `len` deterministic pseudo-random (incompressible) bytes; `seed` picks the sequence.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
