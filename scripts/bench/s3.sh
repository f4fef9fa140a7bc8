#!/usr/bin/env bash
# Benchmark: save and load of a tree (a few large files and many small ones, BENCH_SIZE_MB in all,
# default 1024) on a local S3 server, podfs against `aws s3 cp --recursive` of the same tree.
#
# Self-contained: builds podfs (release), starts its own S3 server on a free loopback port, makes
# the tree in a temporary directory, prints the wall times, ratios and peak RSS of each command
# (GNU time: `/usr/bin/time -f "%e %M"`, as scripts/bench/local.sh), and cleans everything up.
#
#   BENCH_SIZE_MB=1024        total size of the tree (MiB); shrink for a quick run
#   BENCH_SMALL_FILES=10000   number of small (2 KiB) files (capped at BENCH_SIZE_MB * 100)
#   BENCH_SERVER=localstack   localstack (LocalStack's own S3, needs Python >= 3.12 from pyenv;
#                             range GETs cost time per range) or moto (range GETs cost time per
#                             object size: loads look slower than they are). Default: localstack
#                             when it can run here, else moto.
#   BENCH_LS_DIR=DIR          where LocalStack's venv lives (kept between runs; default
#                             ~/.cache/podfs/localstack-s3)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
size_mb=${BENCH_SIZE_MB:-1024}
small=${BENCH_SMALL_FILES:-10000}
(( small > size_mb * 100 )) && small=$((size_mb * 100))
ls_start=/work/shared/tools/localstack-s3/start.sh
[ -x "$ls_start" ] || ls_start="$root/../shared/tools/localstack-s3/start.sh"

server=${BENCH_SERVER:-}
if [ -z "$server" ]; then
  server=moto
  if [ -x "$ls_start" ] && compgen -G "$HOME/.pyenv/versions/3.1[23]*/bin/python" >/dev/null; then
    server=localstack
  fi
fi

echo "bench: building podfs (release)" >&2
(cd "$root" && cargo build --release -q)
podfs="${CARGO_TARGET_DIR:-$root/target}/release/podfs"
commit=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown) # what was built
command -v aws >/dev/null || { echo "bench: the aws CLI is required (scripts/setup.sh)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench: GNU time (/usr/bin/time, Debian package time) is required" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/podfs-bench.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
echo "bench: starting $server on $endpoint" >&2
case "$server" in
  localstack)
    ls_dir=${BENCH_LS_DIR:-$HOME/.cache/podfs/localstack-s3}
    "$ls_start" "$ls_dir" "$port" >"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 1200); do
      curl -s "$endpoint/_localstack/health" 2>/dev/null | grep -q '"s3": "\(running\|available\)"' && break
      kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
      sleep 0.5
    done
    ;;
  moto)
    moto_server -H 127.0.0.1 -p "$port" >"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 600); do
      curl -s -o /dev/null "$endpoint/" 2>/dev/null && break
      sleep 0.1
    done
    ;;
  *) echo "bench: BENCH_SERVER must be localstack or moto" >&2; exit 1 ;;
esac
curl -s -o /dev/null "$endpoint/" || { echo "bench: $server did not start" >&2; cat "$work/server.log" >&2; exit 1; }

echo "bench: making a $size_mb MiB tree ($small small files + 4 large ones)" >&2
tree="$work/tree"
mkdir -p "$tree/small" "$tree/large"
python3 - "$tree/small" "$small" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    sub = os.path.join(d, f"d{i // 500:03}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:05}.txt"), "wb") as f:
        f.write((f"file {i} " * 256).encode()[:2048])
PY
small_mb=$(( (small * 2048 + 1048575) / 1048576 ))
large_mb=$(( (size_mb - small_mb) / 4 ))
(( large_mb < 1 )) && large_mb=1
for i in 1 2 3 4; do head -c $((large_mb * 1048576)) /dev/urandom >"$tree/large/blob$i.bin"; done
total=$(du -sm --apparent-size "$tree" | cut -f1)

export PODFS_HOME="$work/home" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
unset AWS_PROFILE
"$podfs" remote add bench "s3://podfs-bench/?access_key_id={access_key_id}&secret_access_key={secret_access_key}&endpoint=$endpoint" >/dev/null
aws_s3=(aws --endpoint-url "$endpoint" s3)
"${aws_s3[@]}" mb s3://aws-bench >/dev/null

# measure VAR CMD...: runs CMD; sets VAR_s (wall seconds) and VAR_kib (peak RSS, KiB).
measure() {
  local var=$1 secs kib; shift
  if ! /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null; then
    echo "bench: failed: $*" >&2; cat "$work/time" >&2; exit 1
  fi
  read -r secs kib <"$work/time"
  printf -v "${var}_s" %s "$secs"
  printf -v "${var}_kib" %s "$kib"
}
sync

echo "bench: podfs save" >&2
measure p_save "$podfs" save bench bench --from "$tree"
echo "bench: podfs load" >&2
mkdir -p "$work/podfs-out"
measure p_load "$podfs" load bench bench --into "$work/podfs-out"
diff -rq "$tree" "$work/podfs-out" >&2 || { echo "bench: podfs load differs from the tree" >&2; exit 1; }
rm -rf "$work/podfs-out"
echo "bench: aws s3 cp --recursive (upload)" >&2
measure a_save "${aws_s3[@]}" cp --recursive "$tree" s3://aws-bench/tree --only-show-errors
echo "bench: aws s3 cp --recursive (download)" >&2
measure a_load "${aws_s3[@]}" cp --recursive s3://aws-bench/tree "$work/aws-out" --only-show-errors
rm -rf "$work/aws-out"

mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1024:.0f}')" "$1"; }
printf '\nS3 benchmark: %s MiB tree (%s small files + 4 x %s MiB), server %s on loopback, %s CPUs, podfs %s\n' \
  "$total" "$small" "$large_mb" "$server" "$(nproc)" "$commit"
printf '%-6s %10s %14s %8s %16s %20s\n' "" "podfs (s)" "aws s3 cp (s)" "ratio" "podfs RSS (MiB)" "aws s3 cp RSS (MiB)"
for op in save load; do
  if [ "$op" = save ]; then p=$p_save_s a=$a_save_s pk=$p_save_kib ak=$a_save_kib
  else p=$p_load_s a=$a_load_s pk=$p_load_kib ak=$a_load_kib; fi
  printf '%-6s %10s %14s %8s %16s %20s\n' "$op" "$p" "$a" \
    "$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$p" "$a")" \
    "$(mib "$pk")" "$(mib "$ak")"
done
echo "(ratio = podfs time / aws CLI time: below 1 means podfs is faster; RSS = peak resident set size)"
echo "peak RSS (KiB): podfs save $p_save_kib, load $p_load_kib; aws s3 cp upload $a_save_kib, download $a_load_kib"
