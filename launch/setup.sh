#!/usr/bin/env bash
# Install dpo-dist and its pinned stack into .venv (idempotent: a second run only checks).
# torch is pinned to 2.13.0 and installed first, so nothing later pulls another (multi-GB CUDA) build on CPU machines;
# DeepSpeed builds no ops ahead of time (DS_BUILD_OPS=0) and sees that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DPO_DIST_VENV:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
stamp="$VENV/.dpo-dist-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -m pip install -q --disable-pip-version-check -U pip "setuptools>=70" wheel 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
  DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]" 2>&1 \
    | grep -v "is ignored" || true
  "$PY" -c "import torch, deepspeed, accelerate, transformers, trl, peft, dpo_dist" \
    || { echo "setup: the install did not complete (see pip output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# DeepSpeed's CPU accelerator JIT-compiles a small shared-memory comm extension at its first init (~30 s, needs a C++
# compiler); build it once here so runs and tests do not pay it. GPU machines skip this.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  DS_ACCELERATOR=cpu "$PY" - <<'PY' >/dev/null 2>&1 || echo "setup: note: could not pre-build DeepSpeed's CPU comm op"
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load()
PY
fi
