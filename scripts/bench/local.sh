#!/usr/bin/env bash
# Save and load of a tree on the default (local directory) remote, against cp -a and tar, with
# wall time and peak RSS for each. BENCH_SIZE_MB (default 1024) and BENCH_SMALL_FILES (10000)
# size the tree; BENCH_DIR (default: a temp dir under target/) is where it goes.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MB=${BENCH_SIZE_MB:-1024}
SMALL=${BENCH_SMALL_FILES:-10000}
cargo build --release --quiet
PODFS=${CARGO_TARGET_DIR:-$PWD/target}/release/podfs
WORK=$(mktemp -d "${BENCH_DIR:-$PWD/target}/bench-local.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
python3 scripts/bench/maketree.py "$WORK/src" "$SIZE_MB" "$SMALL"
export PODFS_HOME=$WORK/home

# measure NAME CMD...: prints "NAME seconds peak_rss_kib"
measure() {
  local name=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null
  read -r secs rss <"$WORK/time"
  printf '%-28s %8.2f s %10d KiB\n' "$name" "$secs" "$rss"
  echo "$secs $rss" >"$WORK/last"
}
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }

echo "tree: $SIZE_MB MiB, 4 large files + $SMALL small files ($(du -sh "$WORK/src" | cut -f1) on disk)"
measure "podfs save (default remote)" "$PODFS" save bench --from "$WORK/src"; read -r ps pr <"$WORK/last"
measure "tar -cf (archive)" tar -cf "$WORK/tree.tar" -C "$WORK/src" .; read -r ts tr <"$WORK/last"
measure "cp -a" cp -a "$WORK/src" "$WORK/cp-copy"; read -r cs cr <"$WORK/last"
measure "podfs load (into empty dir)" "$PODFS" load bench --into "$WORK/loaded"; read -r ls lr <"$WORK/last"
mkdir -p "$WORK/untar"
measure "tar -xf (extract)" tar -xf "$WORK/tree.tar" -C "$WORK/untar"; read -r xs xr <"$WORK/last"
diff -r "$WORK/src" "$WORK/loaded" >/dev/null && echo "loaded tree identical to source"
touch "$WORK/src/large-0.bin"
measure "podfs save (1 file touched)" "$PODFS" save bench --from "$WORK/src"; read -r is ir <"$WORK/last"
echo
echo "ratios (podfs / baseline, time): save/tar-c $(ratio "$ps" "$ts")  save/cp-a $(ratio "$ps" "$cs")  load/tar-x $(ratio "$ls" "$xs")  load/cp-a $(ratio "$ls" "$cs")"
echo "peak RSS: save ${pr} KiB, load ${lr} KiB, incremental save ${ir} KiB (tar -c ${tr} KiB, cp -a ${cr} KiB)"
