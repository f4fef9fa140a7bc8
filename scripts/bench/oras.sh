#!/usr/bin/env bash
# Benchmark: podfs save/load on an oras:// remote against oras-py push/pull of the same tree.
#
# Self-contained: builds podfs (release), starts its own docker-registry (distribution 2.8) on a
# free loopback port with storage in a temporary directory, generates the tree (a few large files
# and many small ones, random so nothing compresses), and removes everything on exit.
#
#   scripts/bench/oras.sh                        # 1 GiB tree, 10,000 small files
#   BENCH_SIZE_MB=200 scripts/bench/oras.sh      # smaller
#   BENCH_SMALL_FILES=2000 scripts/bench/oras.sh
#
# oras-py ships a directory as one tar+gzip layer (its native way to push a tree) and unpacks it
# on pull; podfs stores the tree as its state zip (small files deflated, large ones stored).
# Prints wall time and peak RSS of each command (GNU time: `/usr/bin/time -f "%e %M"`).
# Needs: cargo, docker-registry, python3 with the `oras` package, /usr/bin/time.
set -euo pipefail

SIZE_MB=${BENCH_SIZE_MB:-1024}
SMALL_FILES=${BENCH_SMALL_FILES:-10000}
SMALL_SHARE=10 # percent of the bytes in small files
LARGE_FILES=4

cd "$(dirname "$0")/../.."
for tool in cargo docker-registry python3 /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing $tool (run scripts/setup.sh)" >&2; exit 1; }
done
python3 -c 'import oras.client' 2>/dev/null || { echo "missing oras-py: pip install oras" >&2; exit 1; }

echo "building podfs (release)..." >&2
cargo build --release --quiet
PODFS="${CARGO_TARGET_DIR:-target}/release/podfs"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/podfs-bench-oras.XXXXXX")
REG_PID=""
cleanup() {
    if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/storage"
cat >"$WORK/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$PORT
  secret: podfs-bench
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; then break; fi
    sleep 0.1
done

echo "making a ${SIZE_MB} MiB tree ($LARGE_FILES large files, $SMALL_FILES small ones)..." >&2
TREE="$WORK/tree"
mkdir -p "$TREE/large" "$TREE/small"
LARGE_BYTES=$(( SIZE_MB * 1024 * 1024 * (100 - SMALL_SHARE) / 100 / LARGE_FILES ))
for i in $(seq 1 "$LARGE_FILES"); do
    head -c "$LARGE_BYTES" /dev/urandom >"$TREE/large/file-$i.bin"
done
python3 - "$TREE/small" "$SMALL_FILES" $(( SIZE_MB * 1024 * 1024 * SMALL_SHARE / 100 )) <<'EOF'
import os, sys
root, count, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = max(1, total // max(1, count))
for i in range(count):
    d = os.path.join(root, f"d{i // 500:03}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}.dat"), "wb") as f:
        f.write(os.urandom(size))
EOF
ACTUAL=$(du -sb "$TREE" | cut -f1)

# measure VAR CMD...: runs CMD; sets VAR (wall seconds) and VAR_KIB (peak RSS, KiB).
measure() {
    local var=$1 secs kib; shift
    if ! /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null; then
        echo "failed: $*" >&2; cat "$WORK/time" >&2; exit 1
    fi
    read -r secs kib <"$WORK/time"
    printf -v "$var" %s "$secs"
    printf -v "${var}_KIB" %s "$kib"
}

export PODFS_HOME="$WORK/podfs-home"
export PODFS_LOG=error
"$PODFS" remote add bench "oras://127.0.0.1:$PORT/bench" >/dev/null

echo "podfs save..." >&2
measure PODFS_SAVE "$PODFS" save tree bench --from "$TREE"
mkdir "$WORK/podfs-load"
echo "podfs load..." >&2
measure PODFS_LOAD "$PODFS" load tree bench --into "$WORK/podfs-load"
diff -r "$TREE" "$WORK/podfs-load" >/dev/null || { echo "podfs load differs from the tree" >&2; exit 1; }

echo "oras-py push..." >&2
cd "$WORK"
measure ORAS_PUSH python3 -c "
import oras.client
oras.client.OrasClient(insecure=True).push(target='127.0.0.1:$PORT/bench/oras-tree:1', files=['tree'], quiet=True)
"
echo "oras-py pull..." >&2
measure ORAS_PULL python3 -c "
import oras.client
oras.client.OrasClient(insecure=True).pull(target='127.0.0.1:$PORT/bench/oras-tree:1', outdir='$WORK/oras-pull')
"
diff -r "$TREE" "$WORK/oras-pull/tree" >/dev/null || { echo "oras-py pull differs from the tree" >&2; exit 1; }

printf '\ntree: %s bytes (%s MiB requested), %s large + %s small files, registry 127.0.0.1:%s\n' \
    "$ACTUAL" "$SIZE_MB" "$LARGE_FILES" "$SMALL_FILES" "$PORT"
mib() { python3 -c "print(f'{$1 / 1024:.0f}')"; }
printf '%-8s %12s %12s %16s %16s %18s\n' "op" "podfs (s)" "oras-py (s)" "oras-py / podfs" "podfs RSS (MiB)" "oras-py RSS (MiB)"
printf '%-8s %12s %12s %16s %16s %18s\n' "save" "$PODFS_SAVE" "$ORAS_PUSH" "$(python3 -c "print(f'{$ORAS_PUSH / $PODFS_SAVE:.2f}x')")" \
    "$(mib "$PODFS_SAVE_KIB")" "$(mib "$ORAS_PUSH_KIB")"
printf '%-8s %12s %12s %16s %16s %18s\n' "load" "$PODFS_LOAD" "$ORAS_PULL" "$(python3 -c "print(f'{$ORAS_PULL / $PODFS_LOAD:.2f}x')")" \
    "$(mib "$PODFS_LOAD_KIB")" "$(mib "$ORAS_PULL_KIB")"
