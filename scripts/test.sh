#!/usr/bin/env bash
# The podfs test command: installs what the tests need (idempotently), then runs every test.
# Tests start their own servers (moto_server, docker-registry) on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# pyenv shims and pip's script dir must be on PATH for moto_server, aws and oras-py.
export PATH="$HOME/.local/bin:$PATH"
if command -v pyenv >/dev/null 2>&1; then
  export PATH="$(pyenv root)/shims:$PATH"
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Integration tests run the real binary and real servers; a few at a time keeps 2 cores usable.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --no-fail-fast -- --test-threads="${PODFS_TEST_THREADS:-4}" 2>&1 | tee "$log"
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
