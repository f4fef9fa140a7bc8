#!/usr/bin/env bash
# Benchmark: writes through `podfs mount` (the write path: changes staged on local disk, saved as
# a new version on fsync) against a direct upload with the aws CLI, `podfs save`, `rclone mount
# --vfs-cache-mode writes` and `s3fs`, and local disk, on LocalStack's own S3.
#
# Self-contained: builds podfs (release), starts LocalStack's S3 on a free loopback port, makes
# the files in a temporary directory (PODFS_HOME there too: the user's config is never touched),
# mounts one FUSE client at a time, and unmounts and removes everything on exit. Every number is
# from one run; compare the ratios, not absolute times across runs. Nothing here asserts on time.
#
# What is measured (medians of BENCH_REPEAT rounds; in each round every tool takes its turn, and
# what a round wrote is deleted from the server before the next tool, so each starts from the
# same state):
#   1. one file of BENCH_WRITE_MB random bytes (made once) written to the S3 server:
#      - podfs mount: `cp FILE MNT/s3/POD/` into a new pod (`mkdir` first, untimed), timed until
#        an fsync of the written file (opened read-only) returns, i.e. until the version is
#        committed; cp and fsync are also shown apart;
#      - podfs save: `podfs save POD s3 --from DIR` of a directory holding only that file;
#      - aws s3 cp: `aws --endpoint-url URL s3 cp FILE s3://plain/KEY` (the CLI's defaults:
#        8 MiB parts, 10 in flight): the reference;
#      - rclone mount: `--vfs-cache-mode writes --vfs-write-back 0s` (the upload starts when the
#        file is closed instead of 5 s later), `cp`, then a HEAD of the object (curl, signed) every
#        50 ms until it exists with the full size: an object appears only once its upload
#        (single or multipart) is complete, so that is when rclone is done;
#      - s3fs mount (no use_cache): `cp`; s3fs uploads when the file is flushed at close, so cp's
#        return is the end (the object's size is checked after, untimed).
#      Seconds, MiB/s, each tool's throughput / the aws CLI's (goal: podfs mount >= 0.8x), CPU
#      time (user + system; mounts: the FUSE daemon's, from /proc/PID/stat fields 14+15, during
#      the timed write; commands: their own, from GNU time) and peak RSS (GNU time).
#   2. BENCH_SMALL_FILES files of 100 bytes in 100 directories, created by one python3 process
#      (open/write/close each) directly in the target directory: through the mount into a new pod,
#      timed until an fsync of the pod's directory returns (the version is committed), against
#      the same creation on local disk followed by sync(), and `podfs save` of that local tree.
#   3. the same pod, right after (same mount): one file overwritten with new bytes of the same
#      size, then an fsync of the pod's directory, timed until it returns; the bytes uploaded
#      (stored_bytes of the new version, `podfs versions --json`), against `podfs save` of the
#      same change made to the local tree (saved in 2 as a pod of its own), time and stored_bytes.
# Before every timed write: `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root; without it
# the sources may come from the page cache and the script says so), then one cheap run of each
# tool's program (python3, cp, podfs list, aws s3 ls), so that the data is cold but no tool is
# timed loading its own code from disk (running FUSE daemons keep theirs).
#
#   BENCH_WRITE_MB=1024       size of the file of measurement 1 (MiB)
#   BENCH_SMALL_FILES=10000   files of measurements 2 and 3 (~100 bytes each, in 100 directories)
#   BENCH_REPEAT=3            rounds of every measurement (medians shown; peak RSS: the highest)
#   BENCH_LS_DIR=DIR          where LocalStack's venv lives (kept between runs; default
#                             ~/.cache/podfs/localstack-s3)
#   quick run: BENCH_WRITE_MB=64 BENCH_SMALL_FILES=500 BENCH_REPEAT=1
#
# Needs: cargo, curl (7.84+), python3, the aws CLI, /usr/bin/time, mountpoint, fuse3
# (fusermount3, /dev/fuse), rclone and s3fs (apt-get install -y rclone s3fs fuse3), and Python
# >= 3.12 from pyenv for LocalStack (shared/tools/localstack-s3/start.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
write_mb=${BENCH_WRITE_MB:-1024}
small=${BENCH_SMALL_FILES:-10000}
repeat=${BENCH_REPEAT:-3}
ls_dir=${BENCH_LS_DIR:-$HOME/.cache/podfs/localstack-s3}
ls_start=/work/shared/tools/localstack-s3/start.sh
[ -x "$ls_start" ] || ls_start="$root/../shared/tools/localstack-s3/start.sh"

missing=""
for tool in cargo curl python3 aws /usr/bin/time mountpoint fusermount3 rclone s3fs; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "bench: missing:$missing" >&2
  echo "bench: install them with: apt-get install -y rclone s3fs fuse3 time curl (the aws CLI: scripts/setup.sh)" >&2
  exit 1
fi
[ -e /dev/fuse ] || { echo "bench: /dev/fuse is missing" >&2; exit 1; }
[ -x "$ls_start" ] || { echo "bench: LocalStack's S3 launcher not found ($ls_start)" >&2; exit 1; }
compgen -G "$HOME/.pyenv/versions/3.1[23]*/bin/python" >/dev/null || [ -n "${PYTHON:-}" ] \
  || { echo "bench: LocalStack needs Python >= 3.12 (pyenv, or PYTHON=/path)" >&2; exit 1; }
(( small >= 1 && write_mb >= 1 && repeat >= 1 )) \
  || { echo "bench: BENCH_WRITE_MB, BENCH_SMALL_FILES and BENCH_REPEAT must be at least 1" >&2; exit 1; }
can_drop=1
[ -w /proc/sys/vm/drop_caches ] || {
  can_drop=0
  echo "bench: WARNING: cannot write /proc/sys/vm/drop_caches (not root): sources may be read from the page cache" >&2
}

echo "bench: building podfs (release)" >&2
(cd "$root" && cargo build --release -q)
podfs="${CARGO_TARGET_DIR:-$root/target}/release/podfs"
commit=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown) # what was built

started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/podfs-bench-write.XXXXXX")
mnt="$work/mnt"
mkdir -p "$work/logs" "$mnt"
server_pid=""
mount_pid=""
# stop_pid PID: stops one process we started (the FUSE client under GNU time: its child first,
# since time does not pass signals on) and waits for it.
stop_pid() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do kill "$child" 2>/dev/null || true; done
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local m
  # Every FUSE mount under the work dir (ours: one at a time, but be thorough), then our processes.
  for m in $(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts 2>/dev/null); do
    fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
  done
  if [ -n "$mount_pid" ]; then stop_pid "$mount_pid"; fi
  if [ -n "$server_pid" ]; then stop_pid "$server_pid"; fi
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# drop_caches: drops the page cache (the files to write are read cold by every tool), then
# warms every tool's own program again (python3, cp, podfs, the aws CLI: a cheap command each),
# so that no tool pays for loading itself from disk: a running FUSE daemon keeps its code (mapped
# pages are not dropped), a command started afterwards would not.
drop_caches() {
  sync
  if [ "$can_drop" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
  if [ -n "${warm_up:-}" ]; then
    "$py" -c 'import os, sys, time'
    cp --version >/dev/null
    "$podfs" list s3 >/dev/null
    "${aws_s3[@]}" ls s3://plain >/dev/null
  fi
}

# secs_since T0: the seconds ("12.345") from T0 (date +%s%N) to now.
secs_since() {
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

# timed CMD...: runs CMD under GNU time (its stdout to $work/out); sets `secs` to its wall time
# ("12.345"), `cpu` to its CPU seconds (user + system) and `kib` to its peak RSS.
timed() {
  local t0 u s
  t0=$(date +%s%N)
  /usr/bin/time -f "%U %S %M" -o "$work/cmd.time" "$@" >"$work/out" \
    || { echo "bench: failed: $*" >&2; cat "$work/cmd.time" >&2; exit 1; }
  secs=$(secs_since "$t0")
  read -r u s kib < <(tail -n 1 "$work/cmd.time")
  cpu=$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')
}

# The timed python3 and aws programs themselves, not pyenv's shims (a shim costs ~0.15 s a start).
py=$(python3 -c 'import sys; print(sys.executable)')
aws_bin=$( (command -v pyenv >/dev/null && pyenv which aws 2>/dev/null) || command -v aws)

# fsync PATH: fsync of a file or directory opened read-only (what the mount saves on).
fsync() { "$py" -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$1"; }

# make_tree DIR N fsync|sync: creates N files of 100 bytes in 100 directories under DIR (which
# exists), one open/write/close each, then fsyncs DIR or calls sync(); prints the seconds of
# each of the two parts. A script of its own, so that GNU time can run it.
cat >"$work/make_tree.py" <<'PY'
import os, sys, time
d, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
per = -(-n // 100)
t0 = time.perf_counter()
for i in range(n):
    sub = os.path.join(d, f"d{i // per:03}")
    if i % per == 0:
        os.mkdir(sub)
    with open(os.path.join(sub, f"f{i:06}.txt"), "wb") as f:
        f.write((f"small file {i}\n" * 8).encode()[:100])
t1 = time.perf_counter()
if how == "fsync":
    os.fsync(os.open(d, os.O_RDONLY))
else:
    os.sync()
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
PY
make_tree=("$py" "$work/make_tree.py")
# change_one DIR N fsync|none: overwrites one file of the tree of N files (the middle one) with
# new bytes of the same size, then fsyncs DIR (or not); prints the seconds of each part.
cat >"$work/change_one.py" <<'PY'
import os, sys, time
d, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
per = -(-n // 100)
i = n // 2
t0 = time.perf_counter()
with open(os.path.join(d, f"d{i // per:03}", f"f{i:06}.txt"), "r+b") as f:
    f.write((f"CHANGED file {i}\n" * 8).encode()[:100])
    f.truncate()
t1 = time.perf_counter()
if how == "fsync":
    os.fsync(os.open(d, os.O_RDONLY))
print(f"{t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
PY
change_one=("$py" "$work/change_one.py")

# versions_field POD FIELD: FIELD of each version of POD on s3, one per line ("N VALUE").
versions_field() {
  "$podfs" versions "$1" s3 --json | python3 -c '
import json, sys
for v in json.load(sys.stdin):
    print(v["version"], v[sys.argv[1]])' "$2"
}

results="$work/results.tsv"
# record MEASUREMENT SUBJECT VALUE UNIT [MIB]: one result. MEASUREMENT starts with its number in
# the list at the top, which orders the table; MIB (bytes written, in MiB) adds a throughput.
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$results"; }

# start_mount TOOL [PODFS ARGS...]: mounts one client on $mnt in the foreground, in the
# background, under GNU time; waits until it is mounted. Sets `base`, where the written files go
# (podfs: the remote's directory, in which a pod is a directory; rclone and s3fs: bucket `plain`).
nmount=0
start_mount() {
  local tool=$1 log cmd
  shift
  nmount=$((nmount + 1))
  log="$work/logs/$nmount-$tool.log"
  case "$tool" in
    podfs) cmd=("$podfs" mount --foreground --remote s3 "$@" "$mnt"); base="$mnt/s3" ;;
    rclone)
      rm -rf "$work/rclone-cache"
      cmd=(rclone mount ls:plain "$mnt" --vfs-cache-mode writes --vfs-write-back 0s --cache-dir "$work/rclone-cache")
      base="$mnt" ;;
    s3fs) cmd=(s3fs plain "$mnt" -f -o "url=$endpoint,use_path_request_style,passwd_file=$work/s3fs.passwd"); base="$mnt" ;;
  esac
  /usr/bin/time -f "%e %M" -o "$work/mount.time" "${cmd[@]}" >"$log" 2>&1 &
  mount_pid=$!
  for _ in $(seq 1 600); do
    mountpoint -q "$mnt" && return 0
    kill -0 "$mount_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench: $tool did not mount on $mnt: ${cmd[*]}" >&2
  cat "$log" >&2
  exit 1
}

# stop_mount: unmounts $mnt, waits for the client to exit; sets `rss_mib`, its peak RSS.
stop_mount() {
  local kib
  for _ in $(seq 1 50); do
    fusermount3 -u "$mnt" 2>/dev/null && break
    sleep 0.2
  done
  mountpoint -q "$mnt" && fusermount3 -uz "$mnt"
  wait "$mount_pid" 2>/dev/null || true
  mount_pid=""
  rm -rf "$work/rclone-cache"
  kib=$(tail -n 1 "$work/mount.time" | cut -d' ' -f2)
  rss_mib=$(( (kib + 512) / 1024 ))
}

# client_cpu: the mounted client's CPU time so far (user + system), in clock ticks.
client_cpu() {
  local pid
  pid=$(pgrep -P "$mount_pid" | head -n 1)
  awk '{ print $14 + $15 }' "/proc/$pid/stat"
}
# cpu_secs TICKS0 TICKS1: the CPU seconds between two client_cpu readings.
cpu_secs() { awk -v a="$1" -v b="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }'; }

maximum() { python3 -c 'import sys; print(max(int(x) for x in sys.argv[1:]))' "$@"; }
# median DIGITS SAMPLES...: the median, with DIGITS decimals.
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[2:]):.{sys.argv[1]}f}")' "$@"; }

# The S3 server.
port=$(free_port)
endpoint="http://127.0.0.1:$port"
echo "bench: starting LocalStack S3 on $endpoint" >&2
"$ls_start" "$ls_dir" "$port" >"$work/logs/localstack.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 1200); do
  curl -s "$endpoint/_localstack/health" 2>/dev/null | grep -q '"s3": "\(running\|available\)"' && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/logs/localstack.log" >&2; exit 1; }
  sleep 0.5
done
curl -s -o /dev/null "$endpoint/" || { echo "bench: LocalStack did not start" >&2; cat "$work/logs/localstack.log" >&2; exit 1; }

export PODFS_HOME="$work/home" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
# AWS_CA_BUNDLE (set by some environments) makes rclone refuse to start even for plain HTTP.
unset AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_CA_BUNDLE
"$podfs" remote add s3 "s3://podfs-bench/?access_key_id={access_key_id}&secret_access_key={secret_access_key}&endpoint=$endpoint" >/dev/null
aws_s3=("$aws_bin" --endpoint-url "$endpoint" s3)
"${aws_s3[@]}" mb s3://plain >/dev/null
export RCLONE_CONFIG="$work/rclone.conf" RCLONE_CONFIG_LS_TYPE=s3 RCLONE_CONFIG_LS_PROVIDER=Other \
  RCLONE_CONFIG_LS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_LS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
  RCLONE_CONFIG_LS_ENDPOINT=$endpoint RCLONE_CONFIG_LS_REGION=us-east-1 RCLONE_CONFIG_LS_FORCE_PATH_STYLE=true
: >"$RCLONE_CONFIG"
echo "plain:$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" >"$work/s3fs.passwd"
chmod 600 "$work/s3fs.passwd"
warm_up=1 # drop_caches can warm the tools from now on
curl_auth=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
# object_size KEY: the size of s3://plain/KEY ("" while it does not exist).
object_size() {
  curl -s -I -o /dev/null -w '%{http_code} %header{content-length}' "${curl_auth[@]}" "$endpoint/plain/$1" \
    | awk '$1 == 200 { print $2 }' | tr -d '\r'
}
delete_object() { curl -sSf -o /dev/null -X DELETE "${curl_auth[@]}" "$endpoint/plain/$1"; }
# wait_object KEY BYTES: polls until s3://plain/KEY exists with BYTES bytes (at most 1 hour).
wait_object() {
  local i
  for i in $(seq 1 72000); do
    [ "$(object_size "$1")" = "$2" ] && return 0
    sleep 0.05
  done
  return 1
}
# check_object KEY BYTES: fails the run unless s3://plain/KEY has BYTES bytes.
check_object() {
  local got
  got=$(object_size "$1")
  [ "$got" = "$2" ] || { echo "bench: s3://plain/$1 has ${got:-no} bytes, not $2" >&2; exit 1; }
}
# check_pod POD VERSIONS: fails the run unless POD has exactly versions 1..VERSIONS.
check_pod() {
  local got
  got=$(versions_field "$1" version | cut -d' ' -f1 | tr '\n' ' ')
  [ "$got" = "$(seq -s ' ' 1 "$2") " ] || { echo "bench: pod $1 has versions ${got:-none}, not 1..$2" >&2; exit 1; }
}

echo "bench: making the files ($write_mb MiB file)" >&2
mkdir -p "$work/src"
head -c $((write_mb * 1048576)) /dev/urandom >"$work/src/big.bin"
src="$work/src/big.bin"
bytes=$((write_mb * 1048576))

m1="1 write $write_mb MiB, until it is on the server"
m1c="1 CPU time (user + system), write $write_mb MiB"
m1r="1 peak RSS, write $write_mb MiB"
m1p="1 podfs mount: the cp alone"
m1f="1 podfs mount: the fsync alone"
m2="2 create $small files of 100 B, until they are committed"
m2c="2 podfs daemon CPU time, create $small files"
m2p="2 podfs mount: the creation alone"
m2f="2 podfs mount: the fsync alone"
m3="3 change 1 of the $small files, until it is committed"
m3p="3 podfs mount: the write alone"
m3f="3 podfs mount: the fsync alone"
m3b="3 bytes uploaded for that change (stored_bytes)"
declare -A runs=()

echo "bench: 1: writing $write_mb MiB ($repeat rounds)" >&2
for round in $(seq 1 "$repeat"); do
  for tool in aws podfs-save podfs-mount rclone s3fs; do
    echo "bench: 1: round $round: $tool" >&2
    case "$tool" in
      aws)
        drop_caches
        timed "${aws_s3[@]}" cp "$src" "s3://plain/aws-$round.bin" --only-show-errors
        check_object "aws-$round.bin" "$bytes"
        delete_object "aws-$round.bin"
        subject="aws s3 cp"
        runs["$subject|$m1r"]+="$(( (kib + 512) / 1024 )) "
        ;;
      podfs-save)
        drop_caches
        timed "$podfs" save "big-save-$round" s3 --from "$work/src"
        check_pod "big-save-$round" 1
        "$podfs" delete "big-save-$round" s3 >/dev/null
        subject="podfs save"
        runs["$subject|$m1r"]+="$(( (kib + 512) / 1024 )) "
        ;;
      podfs-mount)
        start_mount podfs
        pod="big-mount-$round"
        mkdir "$base/$pod"
        drop_caches
        cpu0=$(client_cpu)
        t0=$(date +%s%N)
        cp "$src" "$base/$pod/"
        runs["podfs mount|$m1p"]+="$(secs_since "$t0") "
        t1=$(date +%s%N)
        fsync "$base/$pod/big.bin"
        runs["podfs mount|$m1f"]+="$(secs_since "$t1") "
        secs=$(secs_since "$t0")
        cpu=$(cpu_secs "$cpu0" "$(client_cpu)")
        check_pod "$pod" 1 # committed when fsync returned
        stop_mount
        "$podfs" delete "$pod" s3 >/dev/null
        subject="podfs mount"
        runs["$subject|$m1r"]+="$rss_mib "
        ;;
      rclone)
        start_mount rclone
        drop_caches
        cpu0=$(client_cpu)
        t0=$(date +%s%N)
        cp "$src" "$base/rclone-$round.bin"
        wait_object "rclone-$round.bin" "$bytes" || { echo "bench: rclone never uploaded the file" >&2; exit 1; }
        secs=$(secs_since "$t0")
        cpu=$(cpu_secs "$cpu0" "$(client_cpu)")
        stop_mount
        delete_object "rclone-$round.bin"
        subject="rclone mount"
        runs["$subject|$m1r"]+="$rss_mib "
        ;;
      s3fs)
        start_mount s3fs
        drop_caches
        cpu0=$(client_cpu)
        t0=$(date +%s%N)
        cp "$src" "$base/s3fs-$round.bin"
        secs=$(secs_since "$t0")
        cpu=$(cpu_secs "$cpu0" "$(client_cpu)")
        check_object "s3fs-$round.bin" "$bytes"
        stop_mount
        delete_object "s3fs-$round.bin"
        subject="s3fs mount"
        runs["$subject|$m1r"]+="$rss_mib "
        ;;
    esac
    echo "bench: 1: round $round: $subject: $secs s" >&2
    runs["$subject|$m1"]+="$secs "
    runs["$subject|$m1c"]+="$cpu "
  done
done

echo "bench: 2, 3: $small small files, then one changed ($repeat rounds)" >&2
for round in $(seq 1 "$repeat"); do
  local_tree="$work/many-$round"
  echo "bench: 2: round $round: local disk" >&2
  mkdir "$local_tree"
  drop_caches
  timed "${make_tree[@]}" "$local_tree" "$small" sync
  runs["local disk + sync|$m2"]+="$secs "

  echo "bench: 2: round $round: podfs save" >&2
  drop_caches
  timed "$podfs" save "many-save-$round" s3 --from "$local_tree"
  runs["podfs save|$m2"]+="$secs "

  echo "bench: 2, 3: round $round: podfs mount" >&2
  pod="many-mount-$round"
  start_mount podfs
  mkdir "$base/$pod"
  drop_caches
  cpu0=$(client_cpu)
  timed "${make_tree[@]}" "$base/$pod" "$small" fsync
  runs["podfs mount|$m2c"]+="$(cpu_secs "$cpu0" "$(client_cpu)") "
  runs["podfs mount|$m2"]+="$secs "
  read -r a b <"$work/out"; runs["podfs mount|$m2p"]+="$a "; runs["podfs mount|$m2f"]+="$b "
  check_pod "$pod" 1
  got=$(versions_field "$pod" file_count | cut -d' ' -f2)
  [ "$got" = "$small" ] || { echo "bench: pod $pod has $got files, not $small" >&2; exit 1; }
  drop_caches
  timed "${change_one[@]}" "$base/$pod" "$small" fsync
  runs["podfs mount|$m3"]+="$secs "
  read -r a b <"$work/out"; runs["podfs mount|$m3p"]+="$a "; runs["podfs mount|$m3f"]+="$b "
  check_pod "$pod" 2
  runs["podfs mount|$m3b"]+="$(versions_field "$pod" stored_bytes | awk '$1 == 2 { print $2 }') "
  stop_mount

  echo "bench: 3: round $round: podfs save" >&2
  "${change_one[@]}" "$local_tree" "$small" none >/dev/null
  drop_caches
  timed "$podfs" save "many-save-$round" s3 --from "$local_tree"
  runs["podfs save|$m3"]+="$secs "
  check_pod "many-save-$round" 2
  runs["podfs save|$m3b"]+="$(versions_field "many-save-$round" stored_bytes | awk '$1 == 2 { print $2 }') "

  "$podfs" delete "many-save-$round" s3 >/dev/null
  "$podfs" delete "$pod" s3 >/dev/null
  rm -rf "$local_tree"
done

mapfile -t keys < <(printf '%s\n' "${!runs[@]}" | sort)
for key in "${keys[@]}"; do
  what=${key#*|} subject=${key%%|*}
  # shellcheck disable=SC2086 # the samples are words
  case "$what" in
    "$m1r") record "$what" "$subject" "$(maximum ${runs[$key]})" MiB ;;
    "$m1") record "$what" "$subject" "$(median 3 ${runs[$key]})" s "$write_mb" ;;
    "$m3b") record "$what" "$subject" "$(median 0 ${runs[$key]})" B ;;
    *) record "$what" "$subject" "$(median 3 ${runs[$key]})" s ;;
  esac
done

printf '\nMount write benchmark: podfs %s, %s CPUs, %s, LocalStack S3 on loopback, drop_caches %s\n' \
  "$commit" "$(nproc)" "$(date -u +%Y-%m-%d)" "$([ "$can_drop" = 1 ] && echo yes || echo 'NO (not root)')"
printf 'sizes: %s MiB file, %s small files; %s rounds (medians; peak RSS: the highest); rclone --vfs-cache-mode writes --vfs-write-back 0s; s3fs without use_cache\n\n' \
  "$write_mb" "$small" "$repeat"
python3 - "$results" "$m1" "$m1c" "$m1r" "$m1p" "$m1f" "$m2p" "$m2f" "$m3p" "$m3f" <<'PY'
import sys
path, m1, m1c, m1r, m1p, m1f, m2p, m2f, m3p, m3f = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path)]
val = {(what, subject): (float(value), unit, mib) for what, subject, value, unit, mib in rows}

# 1: every tool against the direct upload.
tools = ["podfs mount", "podfs save", "aws s3 cp", "rclone mount", "s3fs mount"]
mib = float(val[(m1, "aws s3 cp")][2])
ref = val[(m1, "aws s3 cp")][0]
print(f"1. write a {mib:.0f} MiB file until it is on the server (reference: aws s3 cp)\n")
print("| tool | time | MiB/s | throughput / aws s3 cp | CPU (user + sys) | peak RSS |")
print("|---|---|---|---|---|---|")
for t in tools:
    s = val[(m1, t)][0]
    print(f"| {t} | {s:.2f} s | {mib / s:.0f} | {ref / s:.2f}x | {val[(m1c, t)][0]:.2f} s | {val[(m1r, t)][0]:.0f} MiB |")
p = val[(m1, "podfs mount")][0]
print(f"\npodfs mount: cp {val[(m1p, 'podfs mount')][0]:.2f} s, then fsync (the save) {val[(m1f, 'podfs mount')][0]:.2f} s "
      f"(medians of each part; CPU: the daemon's during cp + fsync)")
got = ref / p
print(f"goal: podfs mount >= 0.80x the direct upload's throughput: {got:.2f}x, {'met' if got >= 0.8 else 'NOT met'}\n")

# 2 and 3: podfs mount against the baselines.
print("2, 3. many small files, then one of them changed\n")
print("| # | measurement | podfs mount | baseline | baseline value | podfs mount / baseline |")
print("|---|---|---|---|---|---|")
def show(value, unit):
    return f"{value:.2f} s" if unit == "s" else f"{value:.0f} {unit}"
parts = (m2p, m2f, m3p, m3f)
# by number; in each, the times first, then CPU time and bytes
whats = sorted({w for w, _ in val if not w.startswith("1 ") and w not in parts},
               key=lambda w: (int(w.split(" ", 1)[0]), "CPU" in w or "bytes" in w, w))
for what in whats:
    p = val.get((what, "podfs mount"))
    base = [(s, v) for (w, s), v in val.items() if w == what and s != "podfs mount"]
    num, text = what.split(" ", 1)
    first = True
    for subject, (value, unit, _) in base or [("-", (0.0, "", ""))]:
        ratio = f"{p[0] / value:.2f}" if p and value > 0 else "-"
        cells = [num, text, show(p[0], p[1]) if p else "-"] if first else ["", "", ""]
        cells += [subject, show(value, unit) if subject != "-" else "-", ratio]
        print("| " + " | ".join(cells) + " |")
        first = False
part = lambda m: val[(m, "podfs mount")][0]
print(f"\npodfs mount: 2: creating {part(m2p):.2f} s, then fsync (the save) {part(m2f):.2f} s; "
      f"3: writing {part(m3p):.2f} s, then fsync {part(m3f):.2f} s (medians of each part, timed inside python)")
PY
echo "(2, 3: ratio = podfs mount / baseline: below 1 means podfs mount is faster or uploads less)"
echo
echo "the mount's saves (from its log, INFO 'saved pod'):"
grep -h -o 'saved pod .*' "$work"/logs/*-podfs.log | sed 's/^/  /' || echo "  (none found)"
if grep -h -E ' (WARN|ERROR) ' "$work"/logs/*-podfs.log >"$work/podfs-warnings" 2>/dev/null; then
  echo "podfs logged $(wc -l <"$work/podfs-warnings") warnings or errors, the first ones:"
  head -n 10 "$work/podfs-warnings"
fi
echo "bench: the whole run took $(( $(date +%s) - started )) s (after the build)" >&2
