#!/usr/bin/env bash
# Installs what KubeChain and its tests need on a fresh Debian machine, idempotently:
# a Python venv with the project, redis-server, Node.js (for npx MCP servers), and the kube-apiserver /
# etcd binaries (built once from their Go modules at pinned versions, then cached).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[36m[bootstrap]\033[0m %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    say "missing $*: install it (Debian: sudo apt-get install $*)"
    return 1
  fi
  say "installing $* with apt-get"
  if [ ! -f /tmp/.kubechain-apt-updated ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && touch /tmp/.kubechain-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

PYTHON=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ ! -x .venv/bin/pip ]; then
  # e.g. left by a venv creation that failed half-way: give it pip, or start over
  .venv/bin/python -m ensurepip --upgrade --default-pip >/dev/null 2>&1 || { say "removing .venv: it has no pip"; rm -rf .venv; }
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  if ! "$PYTHON" -m venv .venv; then
    # Debian's python3 leaves venv's pip bootstrap to the python3-venv package
    rm -rf .venv
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
stamp=".venv/.kubechain-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing KubeChain and its dependencies into .venv"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  rm -f .venv/.kubechain-deps-*
  touch "$stamp"
fi

if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
if ! command -v npx >/dev/null 2>&1; then
  apt_install nodejs npm || say "npx unavailable: tests of npm MCP servers will be skipped"
fi

# kube-apiserver + etcd (+ kube-controller-manager): KUBEBUILDER_ASSETS if set, else built and cached.
.venv/bin/python -c "from kubechain.testing.binaries import ensure_binaries; b = ensure_binaries(); print('[bootstrap] control plane binaries:', b.versions)" >&2
