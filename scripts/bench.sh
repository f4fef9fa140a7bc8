#!/usr/bin/env bash
# Runs the benchmarks: local (default remote vs cp -a / tar), then S3 and ORAS when given.
# usage: scripts/bench.sh [local|s3|oras|all]   (default: all)
# Sizes: BENCH_SIZE_MB (default 1024), BENCH_SMALL_FILES (default 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
for b in local s3 oras; do
  if [ "$what" = all ] || [ "$what" = "$b" ]; then
    if [ -x "scripts/bench/$b.sh" ]; then
      echo "== $b =="
      "scripts/bench/$b.sh"
      echo
    fi
  fi
done
