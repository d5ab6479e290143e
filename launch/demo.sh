#!/usr/bin/env bash
# README command 1: install, then run `dpo-dist init` under accelerate launch, 2 processes, DeepSpeed ZeRO-3, on the
# embedded tiny SFT checkpoint and preference data, with one smoke training step. Report: runs/demo/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
cpu=()
command -v nvidia-smi >/dev/null 2>&1 || cpu=(--cpu)   # no GPU here: DeepSpeed's CPU accelerator with gloo
exec .venv/bin/dpo-dist launch "${cpu[@]}" --num-processes 2 --sharding zero3 --port "${PORT:-29511}" -- \
  --output-dir runs/demo --smoke-steps 1 --overwrite "$@"
