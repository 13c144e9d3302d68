#!/usr/bin/env bash
# Installs what KubeChain and its tests need on a fresh Debian machine, idempotently:
# a Python venv with the project, redis-server, Node.js (for npx MCP servers), and the kube-apiserver /
# etcd binaries (built once from their Go modules at pinned versions, then cached).
#
#   scripts/bootstrap.sh [--control-plane=always|on-demand]
#     always     (the default; ./scripts/test): find or build the control-plane binaries now, since the
#                tests always start a local kube-apiserver + etcd.
#     on-demand  (./scripts/up): leave them to `kubechain up`, which finds or builds them (same pinned
#                versions, same KUBEBUILDER_ASSETS, same cache ~/.cache/kubechain/bin) only when it starts a
#                local control plane: --cluster local, or --cluster auto when the current kube context does
#                not answer (or already runs KubeChain). Against a reachable cluster nothing is built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[36m[bootstrap]\033[0m %s\n' "$*" >&2; }

control_plane=always
for arg in "$@"; do
  case "$arg" in
    --control-plane=always | --control-plane=on-demand) control_plane=${arg#--control-plane=} ;;
    *)
      say "unknown argument: $arg (usage: scripts/bootstrap.sh [--control-plane=always|on-demand])"
      exit 2
      ;;
  esac
done

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

# shellcheck source=scripts/lib/venv.sh
. scripts/lib/venv.sh
PYTHON=${PYTHON:-python3}
if problem=$(venv_problem .venv .); then
  say "removing .venv: $problem"
  rm -rf .venv
fi
if [ -x .venv/bin/python ] && [ ! -x .venv/bin/pip ]; then
  # e.g. left by a venv creation that failed half-way: give it pip, or start over
  .venv/bin/python -m ensurepip --upgrade --default-pip >/dev/null 2>&1 || { say "removing .venv: it has no pip"; rm -rf .venv; }
fi
if [ ! -x .venv/bin/python ]; then
  python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    say "cannot run $PYTHON: install Python >= $KUBECHAIN_MIN_PYTHON, or name one with PYTHON=/path/to/python3"
    exit 1
  }
  if ! python_at_least "$python_version" "$KUBECHAIN_MIN_PYTHON"; then
    say "$PYTHON is Python $python_version; KubeChain needs >= $KUBECHAIN_MIN_PYTHON: install one and name it with PYTHON=/path/to/python3"
    exit 1
  fi
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

# redis-server: the tests always start their own, whatever REDIS_URL says (they flush it and pause its
# clients); only `kubechain up` (--control-plane=on-demand) can use the Redis REDIS_URL names instead.
if ! command -v redis-server >/dev/null 2>&1 && { [ "$control_plane" = always ] || [ -z "${REDIS_URL:-}" ]; }; then
  apt_install redis-server
fi
if ! command -v npx >/dev/null 2>&1; then
  apt_install nodejs npm || say "npx unavailable: tests of npm MCP servers will be skipped"
fi

# kube-apiserver + etcd (+ kube-controller-manager): KUBEBUILDER_ASSETS if set, else built and cached.
if [ "$control_plane" = always ]; then
  .venv/bin/python -c "from kubechain.testing.binaries import ensure_binaries; b = ensure_binaries(); print('[bootstrap] control plane binaries:', b.versions)" >&2
else
  say "control plane binaries: not needed yet; kubechain up finds or builds them if it starts a local control plane"
fi
