#!/usr/bin/env bash
# README command 2: install, lint, run the whole test suite (unit + multi-process on CPU, then the slow tests; GPU
# tests skip without one). With arguments, only the pytest selection they make.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check .
for f in launch/*.sh slurm/*.sh slurm/*.sbatch .ci/run; do if [ -f "$f" ]; then bash -n "$f"; fi; done
if command -v shellcheck >/dev/null 2>&1; then shellcheck -e SC2016 launch/*.sh slurm/*.sh slurm/*.sbatch; fi
if [ "$#" -gt 0 ]; then  # a selection of your own (-k, -m, a file): that run alone
  exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
fi
# The default suite, then the tests marked `slow` once (every placement under ZeRO-3 and ZeRO-2 on the deep trained
# checkpoint, the resume end-to-end; conftest skips them unless selected).
# Two pytest-xdist workers, a test file at a time each (a file's shared launches stay shared; conftest starts the
# longest files first): launches wait on rendezvous and timeouts as much as they compute, so a second worker fills
# the idle core. DPO_DIST_TEST_WORKERS=0 runs in one process.
workers="${DPO_DIST_TEST_WORKERS:-2}"
par=()
if [ "$workers" != 0 ]; then par=(-n "$workers" --dist loadfile --no-loadscope-reorder); fi
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${par[@]}" tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${par[@]}" tests -m slow
