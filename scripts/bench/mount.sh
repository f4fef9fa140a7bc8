#!/usr/bin/env bash
# Benchmark: reads through `podfs mount` (issue 8) against direct `curl` GETs of the same bytes,
# `rclone mount` and `s3fs` (S3 only), and local disk, on LocalStack's own S3 and on
# docker-registry (distribution 2.8, an oras:// remote).
#
# Self-contained: builds podfs (release), starts its own servers on free loopback ports, makes the
# files in a temporary directory, mounts one FUSE client at a time, and unmounts and removes
# everything on exit. Every number is from one run; compare the ratios, not absolute times across
# runs. Nothing here asserts on time.
#
# What is measured, on each remote (pod `data`: big.bin, p1..p4.bin, huge.bin; pod `many`):
#   1. cold sequential read of big.bin (`dd bs=1M`) against one curl range GET of the same bytes
#      of the state object, rclone mount and s3fs (reading the same bytes as a plain object);
#      also each mounted client's CPU time (user + system, from /proc) during that read;
#   2. four readers of p1..p4.bin at once, against four curls at once (and rclone, s3fs);
#   3. a cold random 4 KiB read (median of BENCH_TTFB_RUNS offsets, the same for every tool):
#      with the file looked up before the caches are dropped, and from a fresh mount (lookup
#      included), against a curl range GET of 4 KiB (`-w %{time_total}`);
#   4. three warm re-reads of big.bin on the same mount, one after the other right after the
#      cold read (as root, once the whole-file copy is complete, opens pass through to it; the
#      first open that does pays for dropping the FUSE page cache), against warm local reads,
#      and a re-read from podfs's disk cache (new mount, same --cache-dir) against a cold local
#      read; the mount's passthrough and copy counters are printed to stderr;
#   5. `ls -lR` and `find` of a pod of BENCH_MANY_FILES small files, cold (fresh mount) and warm
#      (second run), against the same tree on local disk;
#   6. the daemon's peak RSS while streaming huge.bin with the default cache settings (goal:
#      --memory-cache + 64 MiB). Every mount runs in the foreground under GNU time
#      (`/usr/bin/time -f "%e %M"`), so the peak RSS of each client is reported too.
# Cold: a new mount (podfs: with an empty --cache-dir), then `sync; echo 3 >
# /proc/sys/vm/drop_caches` right before the timed read, for every tool (needs root; without it,
# cold numbers may come from the page cache and the script says so).
#
#   BENCH_BIG_MB=1024        size of big.bin (MiB)
#   BENCH_PAR_MB=256         size of each of p1..p4.bin (MiB)
#   BENCH_HUGE_MB=4096       size of huge.bin, streamed for the peak RSS (MiB; 0 skips it)
#   BENCH_MANY_FILES=100000  files in the `many` pod (1,000 per directory, ~100 bytes each)
#   BENCH_TTFB_RUNS=5        random 4 KiB reads per tool (one fresh mount each)
#   BENCH_REPEAT=3           rounds of measurements 1 and 4 (tools take turns; medians shown)
#   BENCH_REMOTES="s3 oras"  which remotes to run
#   BENCH_LS_DIR=DIR         where LocalStack's venv lives (kept between runs; default
#                            ~/.cache/podfs/localstack-s3)
#   quick run: BENCH_BIG_MB=64 BENCH_PAR_MB=16 BENCH_HUGE_MB=256 BENCH_MANY_FILES=2000 BENCH_TTFB_RUNS=2
#
# Needs: cargo, curl, python3, /usr/bin/time, mountpoint, fuse3 (fusermount3, /dev/fuse),
# docker-registry, rclone and s3fs (apt-get install -y rclone s3fs fuse3), and for S3 Python >= 3.12
# from pyenv for LocalStack (shared/tools/localstack-s3/start.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
big_mb=${BENCH_BIG_MB:-1024}
par_mb=${BENCH_PAR_MB:-256}
huge_mb=${BENCH_HUGE_MB:-4096}
many=${BENCH_MANY_FILES:-100000}
ttfb_runs=${BENCH_TTFB_RUNS:-5}
repeat=${BENCH_REPEAT:-3}
remotes=${BENCH_REMOTES:-s3 oras}
ls_dir=${BENCH_LS_DIR:-$HOME/.cache/podfs/localstack-s3}
ls_start=/work/shared/tools/localstack-s3/start.sh
[ -x "$ls_start" ] || ls_start="$root/../shared/tools/localstack-s3/start.sh"

missing=""
need="cargo curl python3 /usr/bin/time mountpoint fusermount3"
[[ " $remotes " == *" s3 "* ]] && need="$need rclone s3fs"
[[ " $remotes " == *" oras "* ]] && need="$need docker-registry"
for tool in $need; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "bench: missing:$missing" >&2
  echo "bench: install them with: apt-get install -y rclone s3fs fuse3 docker-registry time curl" >&2
  exit 1
fi
[ -e /dev/fuse ] || { echo "bench: /dev/fuse is missing" >&2; exit 1; }
if [[ " $remotes " == *" s3 "* ]]; then
  [ -x "$ls_start" ] || { echo "bench: LocalStack's S3 launcher not found ($ls_start)" >&2; exit 1; }
  compgen -G "$HOME/.pyenv/versions/3.1[23]*/bin/python" >/dev/null || [ -n "${PYTHON:-}" ] \
    || { echo "bench: LocalStack needs Python >= 3.12 (pyenv, or PYTHON=/path)" >&2; exit 1; }
fi
can_drop=1
[ -w /proc/sys/vm/drop_caches ] || {
  can_drop=0
  echo "bench: WARNING: cannot write /proc/sys/vm/drop_caches (not root): cold reads may be served by the page cache" >&2
}

echo "bench: building podfs (release)" >&2
(cd "$root" && cargo build --release -q)
podfs="${CARGO_TARGET_DIR:-$root/target}/release/podfs"
commit=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown) # what was built

work=$(mktemp -d "${TMPDIR:-/tmp}/podfs-bench-mount.XXXXXX")
mnt="$work/mnt"
mkdir -p "$work/logs" "$mnt"
server_pid=""
mount_pid=""
cleanup() {
  local m
  # Every FUSE mount under the work dir (ours: one at a time, but be thorough), then our processes.
  for m in $(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts 2>/dev/null); do
    fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
  done
  if [ -n "$mount_pid" ]; then kill "$mount_pid" 2>/dev/null || true; wait "$mount_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

drop_caches() {
  sync
  if [ "$can_drop" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

# timed CMD...: runs CMD (its stdout to /dev/null); sets `secs` to its wall time ("12.345").
timed() {
  local t0 t1 ms
  t0=$(date +%s%N)
  "$@" >/dev/null || { echo "bench: failed: $*" >&2; exit 1; }
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  printf -v secs '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

read_file() { dd if="$1" of=/dev/null bs=1M status=none; }

# read_all FILE...: one `dd bs=1M` per file, all at once; fails if any fails.
read_all() {
  local f p pids=()
  for f in "$@"; do read_file "$f" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
}

# curl_all URL RANGE [URL RANGE]...: one curl range GET per pair, all at once, bodies discarded.
curl_all() {
  local p pids=()
  while [ $# -gt 0 ]; do
    curl -sSf -o /dev/null "${curl_auth[@]}" -r "$2" "$1" & pids+=($!)
    shift 2
  done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
}

results="$work/results.tsv"
# record REMOTE MEASUREMENT SUBJECT VALUE UNIT [MIB]: one result ("podfs" or a baseline); MIB
# (bytes read, in MiB) adds a throughput to times. MEASUREMENT starts with its number in the
# list at the top, which orders the table.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$results"; }

# start_mount TOOL [PODFS ARGS...]: mounts one client on $mnt in the foreground, in the
# background, under GNU time; waits until it is mounted. Sets `base`: the directory holding
# big.bin, p1..p4.bin and huge.bin (podfs: the pod `data`; rclone and s3fs: the bucket `plain`).
nmount=0
start_mount() {
  local tool=$1 log cmd
  shift
  nmount=$((nmount + 1))
  log="$work/logs/$nmount-$tool.log"
  case "$tool" in
    podfs) cmd=("$podfs" mount --foreground --remote "$remote" "$@" "$mnt"); base="$mnt/$remote/data" ;;
    rclone) cmd=(rclone mount ls:plain "$mnt" --read-only --vfs-cache-mode off); base="$mnt" ;;
    s3fs) cmd=(s3fs plain "$mnt" -f -o "url=$endpoint,use_path_request_style,passwd_file=$work/s3fs.passwd,ro"); base="$mnt" ;;
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

# A fresh, empty disk cache for podfs (the old one is removed: it would fill the disk).
new_cache() {
  rm -rf "$work/cache"
  cache="$work/cache"
}
cache_mb=$(( 4 * big_mb > 1024 ? 4 * big_mb : 1024 )) # at least 4x big.bin: whole-file copies are made of files up to a quarter of the cache
metrics_addr="127.0.0.1:$(free_port)"
podfs_mount() { start_mount podfs --cache-dir "$cache" --cache-size "${cache_mb}M" --metrics "$metrics_addr" "$@"; }
# podfs_says: what the mount's metrics say about how the last reads were served (to stderr).
podfs_says() {
  curl -s "http://$metrics_addr/metrics" | grep -E '^podfs_(passthrough_opens_total|cache_file_copies_total|cache_fetches_total|cache_copy_hits_total) ' |
    tr '\n' ' ' | sed 's/^/bench: podfs metrics: /' >&2
  echo >&2
}

echo "bench: making the files ($big_mb MiB, 4 x $par_mb MiB, $huge_mb MiB, $many small files)" >&2
tree="$work/tree"
mkdir -p "$tree/data" "$tree/many"
head -c $((big_mb * 1048576)) /dev/urandom >"$tree/data/big.bin"
for i in 1 2 3 4; do head -c $((par_mb * 1048576)) /dev/urandom >"$tree/data/p$i.bin"; done
(( huge_mb > 0 )) && head -c $((huge_mb * 1048576)) /dev/urandom >"$tree/data/huge.bin"
python3 - "$tree/many" "$many" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    sub = os.path.join(d, f"d{i // 1000:03}")
    if i % 1000 == 0:
        os.makedirs(sub)
    with open(os.path.join(sub, f"f{i:06}.txt"), "wb") as f:
        f.write((f"small file {i}\n" * 6).encode()[:100])
PY
big_bytes=$((big_mb * 1048576))
# The random 4 KiB offsets (seeded: the same in every run and for every tool), not block-aligned.
offsets=$(python3 -c "
import random, sys
r = random.Random(8)
print(' '.join(str(r.randrange(0, $big_bytes - 4096)) for _ in range($ttfb_runs)))")

export PODFS_HOME="$work/home" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1
# AWS_CA_BUNDLE (set by some environments) makes rclone refuse to start even for plain HTTP.
unset AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_CA_BUNDLE

# Local baselines for the tree walks, once (both remotes compare with them; the local file
# reads take turns with the tools, below).
echo "bench: local disk" >&2
drop_caches; timed ls -lR "$tree/many"; local_ls_cold=$secs
timed ls -lR "$tree/many"; local_ls_warm=$secs
drop_caches; timed find "$tree/many"; local_find_cold=$secs
timed find "$tree/many"; local_find_warm=$secs

maximum() { python3 -c 'import sys; print(max(int(x) for x in sys.argv[1:]))' "$@"; }
# median DIGITS SAMPLES...: the median, with DIGITS decimals.
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[2:]):.{sys.argv[1]}f}")' "$@"; }

# ttfb FILE OFFSET LOCAL: prints the milliseconds an open + 4 KiB pread of FILE at OFFSET takes
# (interpreter start-up not included), after checking the bytes against LOCAL.
ttfb() {
  python3 - "$@" <<'PY'
import os, sys, time
path, off, local = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
fd = os.open(path, os.O_RDONLY)
got = os.pread(fd, 4096, off)
t1 = time.perf_counter()
os.close(fd)
with open(local, "rb") as f:
    f.seek(off)
    if f.read(4096) != got:
        sys.exit(f"bench: {path} at {off}: wrong bytes")
print(f"{(t1 - t0) * 1000:.3f}")
PY
}

# The tools that read through a mount on this remote.
clients() { if [ "$remote" = s3 ]; then echo podfs rclone s3fs; else echo podfs; fi; }
mount_client() { if [ "$1" = podfs ]; then new_cache; podfs_mount; else start_mount "$1"; fi; }

bench_remote() {
  remote=$1
  local port url state_url tool subject off fresh_samples lookup_samples curl_samples
  port=$(free_port)
  endpoint="http://127.0.0.1:$port"
  case "$remote" in
    s3)
      echo "bench: starting LocalStack S3 on $endpoint" >&2
      "$ls_start" "$ls_dir" "$port" >"$work/logs/localstack.log" 2>&1 &
      server_pid=$!
      for _ in $(seq 1 1200); do
        curl -s "$endpoint/_localstack/health" 2>/dev/null | grep -q '"s3": "\(running\|available\)"' && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/logs/localstack.log" >&2; exit 1; }
        sleep 0.5
      done
      url="s3://podfs-bench/?access_key_id={access_key_id}&secret_access_key={secret_access_key}&endpoint=$endpoint"
      curl_auth=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
      ;;
    oras)
      echo "bench: starting docker-registry on $endpoint" >&2
      mkdir -p "$work/registry"
      cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
  secret: podfs-bench
EOF
      docker-registry serve "$work/registry.yml" >"$work/logs/registry.log" 2>&1 &
      server_pid=$!
      for _ in $(seq 1 100); do curl -s -o /dev/null "$endpoint/v2/" && break; sleep 0.1; done
      url="oras://127.0.0.1:$port/bench"
      curl_auth=(-L)
      ;;
  esac
  curl -s -o /dev/null "$endpoint/" || { echo "bench: the $remote server did not start" >&2; exit 1; }
  "$podfs" remote add "$remote" "$url" >/dev/null
  echo "bench: $remote: podfs save data, many" >&2
  timed "$podfs" save data "$remote" --from "$tree/data"; echo "bench: $remote: saved data in $secs s" >&2
  timed "$podfs" save many "$remote" --from "$tree/many"; echo "bench: $remote: saved many in $secs s" >&2

  # Where each file's bytes are in the state object: curl reads exactly those.
  "$podfs" inspect data "$remote" --json >"$work/data.json"
  local -A range range_end
  eval "$(python3 - "$work/data.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for e in m["entries"]:
    if e["kind"] == "file":
        d = e["data"]
        assert d["method"] == "stored" and d["state"] == 1, e
        print(f'range[{e["path"]}]={d["offset"]}; range_end[{e["path"]}]={d["offset"] + d["csize"] - 1}')
PY
)"
  if [ "$remote" = s3 ]; then
    state_url="$endpoint/podfs-bench/localstack-pod-data-state-1.zip"
  else
    state_url="$endpoint/v2/bench/data/blobs/$(curl -sSf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "$endpoint/v2/bench/data/manifests/1" | python3 -c '
import json, sys
for l in json.load(sys.stdin)["layers"]:
    if l.get("annotations", {}).get("org.opencontainers.image.title") == "localstack-pod-data-state-1.zip":
        print(l["digest"])')"
  fi
  byte_range() { echo "${range[$1]}-${range_end[$1]}"; }

  if [ "$remote" = s3 ]; then
    echo "bench: s3: uploading the plain objects for rclone and s3fs" >&2
    export RCLONE_CONFIG="$work/rclone.conf" RCLONE_CONFIG_LS_TYPE=s3 RCLONE_CONFIG_LS_PROVIDER=Other \
      RCLONE_CONFIG_LS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_LS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
      RCLONE_CONFIG_LS_ENDPOINT=$endpoint RCLONE_CONFIG_LS_REGION=us-east-1 RCLONE_CONFIG_LS_FORCE_PATH_STYLE=true
    : >"$RCLONE_CONFIG"
    echo "plain:$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" >"$work/s3fs.passwd"
    chmod 600 "$work/s3fs.passwd"
    rclone mkdir ls:plain
    rclone copy "$tree/data" ls:plain --exclude huge.bin
  fi

  local m1="1 cold sequential read, $big_mb MiB (dd bs=1M)"
  local m2="2 four readers at once, 4 x $par_mb MiB"
  local m3="3 cold random 4 KiB read, file looked up (median of $ttfb_runs)"
  local m3b="3 cold random 4 KiB read from a fresh mount, incl. lookup (median of $ttfb_runs)"
  local m4="4 warm re-read, $big_mb MiB (same mount, right after the cold read)"
  local m4a="4 warm re-read again, $big_mb MiB (same mount)"
  local m4c="4 warm re-read a third time, $big_mb MiB (same mount)"
  local m4b="4 re-read from the disk cache, $big_mb MiB (new mount, page cache dropped)"
  local mr="1 client peak RSS, cold sequential $big_mb MiB"
  local mc="1 client CPU time (user + system), cold sequential $big_mb MiB"

  # 1 and 4: cold sequential, then warm and disk-cache re-reads. This machine's storage and the
  # servers change speed from one minute to the next, so every tool, the curl baseline and the
  # local file take turns, $repeat rounds; the median is shown (peak RSS: the highest).
  # warm_rereads SUBJECT FILE: three timed re-reads of FILE, one after the other (4, 4a, 4c).
  warm_rereads() {
    local m
    for m in "$m4" "$m4a" "$m4c"; do
      timed read_file "$2"
      runs["$1|$m"]+="$secs "
    done
  }
  echo "bench: $remote: cold sequential read ($repeat rounds)" >&2
  local -A runs=()
  local round key cpu0 cpu1
  for round in $(seq 1 "$repeat"); do
    for tool in $(clients) curl local; do
      case "$tool" in
        curl)
          drop_caches; timed curl_all "$state_url" "$(byte_range big.bin)"
          runs["curl range GET|$m1"]+="$secs "
          continue ;;
        local)
          drop_caches; timed read_file "$tree/data/big.bin"
          runs["local file, cold|$m4b"]+="$secs "
          warm_rereads "local file, warm" "$tree/data/big.bin"
          continue ;;
      esac
      [ "$tool" = podfs ] && subject=podfs || subject="$tool mount"
      mount_client "$tool"
      stat "$base/big.bin" >/dev/null
      drop_caches; cpu0=$(client_cpu); timed read_file "$base/big.bin"; cpu1=$(client_cpu)
      runs["$subject|$m1"]+="$secs "
      runs["$subject|$mc"]+="$(cpu_secs "$cpu0" "$cpu1") "
      if [ "$tool" = podfs ]; then
        warm_rereads podfs "$base/big.bin"
        podfs_says
        cmp "$base/big.bin" "$tree/data/big.bin" # (untimed) the bytes the cold read left in the page cache
        stop_mount
        runs["podfs|$mr"]+="$rss_mib "
        podfs_mount # the same cache dir
        stat "$base/big.bin" >/dev/null
        drop_caches; timed read_file "$base/big.bin"
        runs["podfs|$m4b"]+="$secs "
        stop_mount
      else
        stop_mount
        runs["$subject|$mr"]+="$rss_mib "
      fi
    done
  done
  local keys
  mapfile -t keys < <(printf '%s\n' "${!runs[@]}" | sort) # a stable order of baselines
  for key in "${keys[@]}"; do
    # shellcheck disable=SC2086 # the samples are words
    if [[ "$key" == *"|$mr" ]]; then
      record "$remote" "${key#*|}" "${key%%|*}" "$(maximum ${runs[$key]})" MiB
    elif [[ "$key" == *"|$mc" ]]; then
      record "$remote" "${key#*|}" "${key%%|*}" "$(median 3 ${runs[$key]})" s
    else
      record "$remote" "${key#*|}" "${key%%|*}" "$(median 3 ${runs[$key]})" s "$big_mb"
    fi
  done

  # 2: four readers at once.
  echo "bench: $remote: four readers at once" >&2
  for tool in $(clients); do
    mount_client "$tool"
    stat "$base"/p[1-4].bin >/dev/null
    drop_caches; timed read_all "$base"/p[1-4].bin
    stop_mount
    [ "$tool" = podfs ] && subject=podfs || subject="$tool mount"
    record "$remote" "$m2" "$subject" "$secs" s $((4 * par_mb))
  done
  drop_caches
  timed curl_all "$state_url" "$(byte_range p1.bin)" "$state_url" "$(byte_range p2.bin)" \
    "$state_url" "$(byte_range p3.bin)" "$state_url" "$(byte_range p4.bin)"
  record "$remote" "$m2" "4 curl range GETs at once" "$secs" s $((4 * par_mb))

  # 3: time to the first 4 KiB at random offsets, cold.
  echo "bench: $remote: cold random 4 KiB reads" >&2
  for tool in $(clients); do
    lookup_samples=() fresh_samples=()
    for off in $offsets; do
      mount_client "$tool"
      stat "$base/big.bin" >/dev/null
      drop_caches
      lookup_samples+=("$(ttfb "$base/big.bin" "$off" "$tree/data/big.bin")")
      stop_mount
      mount_client "$tool"
      drop_caches
      fresh_samples+=("$(ttfb "$base/big.bin" "$off" "$tree/data/big.bin")")
      stop_mount
    done
    [ "$tool" = podfs ] && subject=podfs || subject="$tool mount"
    record "$remote" "$m3" "$subject" "$(median 1 "${lookup_samples[@]}")" ms
    record "$remote" "$m3b" "$subject" "$(median 1 "${fresh_samples[@]}")" ms
  done
  curl_samples=()
  for off in $offsets; do
    drop_caches
    curl_samples+=("$(curl -sSf -o /dev/null "${curl_auth[@]}" -w '%{time_total}' \
      -r "$((${range[big.bin]} + off))-$((${range[big.bin]} + off + 4095))" "$state_url" \
      | python3 -c 'import sys; print(float(sys.stdin.read()) * 1000)')")
  done
  record "$remote" "$m3" "curl range GET of 4 KiB" "$(median 1 "${curl_samples[@]}")" ms
  record "$remote" "$m3b" "curl range GET of 4 KiB" "$(median 1 "${curl_samples[@]}")" ms

  # 5: ls -lR and find of many small files.
  echo "bench: $remote: ls -lR and find of $many files" >&2
  local lsdir="$mnt/$remote/many"
  for cmd in "ls -lR" find; do
    new_cache; podfs_mount
    drop_caches; timed $cmd "$lsdir"
    record "$remote" "5 $cmd, $many files, cold" podfs "$secs" s
    timed $cmd "$lsdir"
    record "$remote" "5 $cmd, $many files, warm" podfs "$secs" s
    stop_mount
    if [ "$cmd" = find ]; then
      record "$remote" "5 $cmd, $many files, cold" "local disk, cold" "$local_find_cold" s
      record "$remote" "5 $cmd, $many files, warm" "local disk, warm" "$local_find_warm" s
    else
      record "$remote" "5 $cmd, $many files, cold" "local disk, cold" "$local_ls_cold" s
      record "$remote" "5 $cmd, $many files, warm" "local disk, warm" "$local_ls_warm" s
    fi
  done

  # 6: peak RSS while streaming the huge file with the default cache settings.
  if (( huge_mb > 0 )); then
    echo "bench: $remote: streaming $huge_mb MiB for the peak RSS" >&2
    new_cache
    start_mount podfs --cache-dir "$cache"
    stat "$base/huge.bin" >/dev/null
    drop_caches; timed read_file "$base/huge.bin"
    stop_mount
    record "$remote" "6 cold sequential read, $huge_mb MiB, default cache settings" podfs "$secs" s "$huge_mb"
    record "$remote" "6 daemon peak RSS streaming $huge_mb MiB" podfs "$rss_mib" MiB
    record "$remote" "6 daemon peak RSS streaming $huge_mb MiB" "goal: --memory-cache 64M + 64 MiB" 128 MiB
  fi
  new_cache

  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

for r in $remotes; do
  case "$r" in
    s3 | oras) bench_remote "$r" ;;
    *) echo "bench: BENCH_REMOTES takes s3 and oras" >&2; exit 1 ;;
  esac
done

printf '\nMount read benchmark: podfs %s, %s CPUs, %s, drop_caches %s\n' "$commit" "$(nproc)" "$(date -u +%Y-%m-%d)" \
  "$([ "$can_drop" = 1 ] && echo yes || echo 'NO (not root)')"
printf 'sizes: big %s MiB, 4 x %s MiB, huge %s MiB, %s small files; rclone --vfs-cache-mode off; s3fs without use_cache\n\n' \
  "$big_mb" "$par_mb" "$huge_mb" "$many"
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
groups = {}
for remote, what, subject, value, unit, mib in rows:
    groups.setdefault((remote, what), []).append((subject, float(value), unit, mib))
def show(value, unit, mib):
    s = f"{value:.2f} s" if unit == "s" else f"{value:.1f} {unit}" if unit == "ms" else f"{value:.0f} {unit}"
    if unit == "s" and mib and value > 0:
        s += f" ({float(mib) / value:.0f} MiB/s)"
    return s
remotes = list(dict.fromkeys(r for r, _ in groups))
order = sorted(groups, key=lambda k: (remotes.index(k[0]), int(k[1].split(" ", 1)[0])))
print("| remote | # | measurement | podfs | baseline | baseline value | podfs / baseline |")
print("|---|---|---|---|---|---|---|")
for remote, what in order:
    entries = groups[(remote, what)]
    num, what = what.split(" ", 1)
    podfs = [e for e in entries if e[0] == "podfs"]
    base = [e for e in entries if e[0] != "podfs"]
    p = podfs[0] if podfs else None
    first = True
    for subject, value, unit, mib in base or [("-", 0.0, "", "")]:
        ratio = f"{p[1] / value:.2f}" if p and value > 0 else "-"
        cells = [remote, num, what, show(p[1], p[2], p[3]) if p else "-"] if first else ["", "", "", ""]
        cells += [subject, show(value, unit, mib) if subject != "-" else "-", ratio]
        print("| " + " | ".join(cells) + " |")
        first = False
PY
echo "(ratio = podfs / baseline: for times, below 1 means podfs is faster)"
if grep -h -E ' (WARN|ERROR) ' "$work"/logs/*-podfs.log >"$work/podfs-warnings" 2>/dev/null; then
  echo "podfs logged $(wc -l <"$work/podfs-warnings") warnings or errors, the first ones:"
  head -n 10 "$work/podfs-warnings"
fi
