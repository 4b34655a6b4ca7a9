#!/usr/bin/env bash
# README command B (and .ci/run): install everything into ./.venv, then run the whole test suite.
# Exits non-zero when a test fails, and also when pytest collects no test at all (exit 5).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # tests never download anything
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
