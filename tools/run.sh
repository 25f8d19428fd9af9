#!/usr/bin/env bash
# The two set-up commands of the README. Each creates ./.venv on first use (CPU torch, the project and
# its test tools), then:
#   bash tools/run.sh train [hydra overrides...]   the embedded default job (tiny MoE, arithmetic, CPU)
#   bash tools/run.sh test  [pytest args...]       the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${R1MEGA_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.r1mega-installed" ] || [ pyproject.toml -nt "$VENV/.r1mega-installed" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"        # the CPU build (a local wheel on these machines)
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$VENV/.r1mega-installed"
fi
export PATH="$PWD/$VENV/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=${1:-}; shift || true
case "$cmd" in
  train) exec r1mega-train "$@" ;;
  test)
    set +e
    python -m pytest -q -p no:cacheprovider --durations=25 "$@"  # the slowest tests: CI has a 30-minute limit
    rc=$?
    if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
    exit $rc ;;
  *) echo "usage: bash tools/run.sh {train|test} [args...]" >&2; exit 2 ;;
esac
