#!/usr/bin/env bash
# README command 2: install, lint, run the whole test suite (unit + multi-process on CPU; GPU tests skip without one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check .
for f in launch/*.sh slurm/*.sh slurm/*.sbatch .ci/run; do if [ -f "$f" ]; then bash -n "$f"; fi; done
if command -v shellcheck >/dev/null 2>&1; then shellcheck -e SC2016 launch/*.sh slurm/*.sh slurm/*.sbatch; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
