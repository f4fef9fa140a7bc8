#!/usr/bin/env bash
# Installs what the podfs tests and benchmarks need, idempotently:
#   apt: fuse3 (fusermount3), docker-registry (CNCF distribution 2.8), skopeo, apache2-utils (htpasswd), rsync, git,
#        time (GNU time: peak RSS in tests and benchmarks)
#   pip: moto[server] >= 5.2.5 (S3), oras (oras-py), boto3, awscli
# Safe to run again: each step checks first and installs only what is missing.
set -euo pipefail

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
command -v htpasswd >/dev/null 2>&1 || need_apt+=(apache2-utils)
[ -x /usr/bin/time ] || need_apt+=(time)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v git >/dev/null 2>&1 || need_apt+=(git)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a registry on :5000 as a service; the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi

PY=${PYTHON:-python3}
if ! "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as m
def v(name):
    return tuple(int(x) for x in m.version(name).split(".")[:3] if x.isdigit())
assert v("moto") >= (5, 2, 5)
for name in ("flask", "flask-cors", "oras", "boto3", "awscli"):
    m.version(name)
PY
then
  echo "setup: pip install moto[server]>=5.2.5 oras boto3 awscli"
  "$PY" -m pip install -q --disable-pip-version-check 'moto[server]>=5.2.5' oras boto3 awscli
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install Rust with rustup" >&2; exit 1; }
echo "setup: ok"
