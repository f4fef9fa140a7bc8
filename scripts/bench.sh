#!/usr/bin/env bash
# Runs the benchmarks: local (default remote vs cp -a / tar), S3 and ORAS (save/load), mount
# (reads through `podfs mount` vs curl, rclone mount, s3fs; sizes in scripts/bench/mount.sh) and
# write (writes through `podfs mount` vs aws s3 cp, podfs save, rclone mount, s3fs, local disk;
# sizes in scripts/bench/write.sh).
# usage: scripts/bench.sh [local|s3|oras|mount|write|all]   (default: all)
# Sizes: BENCH_SIZE_MB (default 1024), BENCH_SMALL_FILES (default 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
for b in local s3 oras mount write; do
  if [ "$what" = all ] || [ "$what" = "$b" ]; then
    if [ -x "scripts/bench/$b.sh" ]; then
      echo "== $b =="
      "scripts/bench/$b.sh"
      echo
    fi
  fi
done
