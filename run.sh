#!/usr/bin/env bash
# The README's commands. Each one first bootstraps what it needs:
#   - .venv (Python 3.11 or 3.12), (re)installed from requirements/{lock,dev}.txt and `pip install -e .` whenever
#     one of those files or pyproject.toml changes (a hash stamp lives in .venv);
#   - the example CT data (`python -m mim3d.example_data fetch`, cached outside the repository).
#
#   ./run.sh demo [args]        the main job: python -m mim3d demo
#   ./run.sh test [args]        ruff, then pytest (what CI runs); args go to pytest, e.g. ./run.sh test -k example_data
#   ./run.sh bench NAME [args]  python bench/bench_NAME.py (pretrain, segment, training, pretraining_benefit)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
STAMP="$VENV/.mim3d-install-stamp"
INSTALL_LOG="$VENV/install.log"

die() { echo "run.sh: $*" >&2; exit 1; }

usage() { sed -n '7,9p' "$0" | sed 's/^# *//'; }

base_python() {
  local candidate
  for candidate in python3.11 python3.12 python3; do
    # pyenv shims exist for versions that are not installed, so run the candidate rather than trust `command -v`
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  die "needs Python 3.11 or 3.12 (python3.11, python3.12 or python3 on PATH); found none"
}

install_stamp() {
  "$VENV/bin/python" - requirements/lock.txt requirements/dev.txt pyproject.toml <<'EOF'
import hashlib, sys
digest = hashlib.sha256(sys.version.encode())
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        digest.update(f.read())
print(digest.hexdigest())
EOF
}

bootstrap() {
  if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    local python
    python=$(base_python)
    echo "run.sh: creating $VENV with $("$python" --version)" >&2
    rm -rf "$VENV"
    "$python" -m venv "$VENV"
  fi
  local stamp
  stamp=$(install_stamp)
  if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$stamp" ]]; then
    echo "run.sh: installing the pinned requirements into $VENV (log: $INSTALL_LOG)" >&2
    if ! { "$VENV/bin/python" -m pip install -r requirements/lock.txt -r requirements/dev.txt \
           && "$VENV/bin/python" -m pip install --no-deps -e .; } </dev/null >"$INSTALL_LOG" 2>&1; then
      tail -n 40 "$INSTALL_LOG" >&2
      die "pip install failed; the full log is $INSTALL_LOG"
    fi
    echo "$stamp" >"$STAMP"
  fi
  # Native libraries loaded by the tests (VTK, ITK) can reset the C locale to ASCII mid-run; keep text I/O UTF-8.
  export PYTHONUTF8=1
  export VIRTUAL_ENV="$PWD/$VENV"
  export PATH="$VIRTUAL_ENV/bin:$PATH"
  python -m mim3d.example_data fetch >/dev/null </dev/null
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case "$command" in
  demo)
    bootstrap
    exec python -m mim3d demo "$@"
    ;;
  test)
    bootstrap
    ruff check --quiet .
    status=0
    python -m pytest -q "$@" || status=$?
    if [[ $status -eq 5 ]]; then  # pytest: no tests collected (e.g. a -k that matches nothing) is not a failure
      echo "run.sh: pytest collected no tests" >&2
      exit 0
    fi
    exit "$status"
    ;;
  bench)
    name=${1:-}
    [[ $# -gt 0 ]] && shift
    if [[ -z "$name" || ! -f "bench/bench_$name.py" ]]; then
      names=$(cd bench && ls bench_*.py | sed 's/^bench_//; s/\.py$//' | paste -sd ' ' -)
      die "bench: give one of: $names"
    fi
    bootstrap
    exec python "bench/bench_$name.py" "$@"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
