# shellcheck shell=bash
# venv_problem VENV CHECKOUT: prints why the virtualenv VENV cannot serve the checkout at CHECKOUT (and
# returns 0), or prints nothing (and returns 1) when it can. Sourced by scripts/bootstrap.sh, which starts
# such a venv over rather than failing later inside pip or at the first import.
KUBECHAIN_MIN_PYTHON="3.11"

venv_problem() {
  local venv=$1 checkout=$2 version shebang installed
  [ -e "$venv" ] || [ -L "$venv/bin/python" ] || return 1
  if ! version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "its python does not run (the interpreter it was made with was removed or moved)"
    return 0
  fi
  if ! python_at_least "$version" "$KUBECHAIN_MIN_PYTHON"; then
    echo "it was made with Python $version; KubeChain needs Python >= $KUBECHAIN_MIN_PYTHON"
    return 0
  fi
  # pip's launcher names the venv's python by absolute path: a venv made elsewhere and moved here runs
  # its python, but not its scripts
  if [ -f "$venv/bin/pip" ]; then
    shebang=$(head -n 1 "$venv/bin/pip")
    shebang=${shebang#\#!}
    # (a very long path gets a /bin/sh launcher instead: not checked)
    if [[ $shebang == */python* ]] && [ "$(cd "$(dirname "$shebang")" 2>/dev/null && pwd -P)" != "$(cd "$venv/bin" && pwd -P)" ]; then
      echo "it was made at ${shebang%/bin/*} and moved (its scripts still run that path)"
      return 0
    fi
  fi
  # an editable install of another checkout would run that checkout's code (-I: not the one in the cwd)
  installed=$("$venv/bin/python" -I -c 'import kubechain, os; print(os.path.dirname(os.path.dirname(os.path.realpath(kubechain.__file__))))' 2>/dev/null) || return 1
  if [ "$installed" != "$(cd "$checkout" && pwd -P)" ]; then
    echo "it runs KubeChain from $installed, not from this checkout"
    return 0
  fi
  return 1
}

# python_at_least HAVE WANT: whether version HAVE (major.minor) >= WANT
python_at_least() {
  local have_major=${1%%.*} have_minor=${1#*.} want_major=${2%%.*} want_minor=${2#*.}
  [ "$have_major" -gt "$want_major" ] || { [ "$have_major" -eq "$want_major" ] && [ "$have_minor" -ge "$want_minor" ]; }
}
