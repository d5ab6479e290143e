#!/usr/bin/env bash
# The prepared device check (issue 25): install what this machine lacks from the project's own pins, then run
# bench/gpu_check.py (its --help and bench/GPU.md say what it runs and writes).
#
#   bash bench/gpu_check.sh --out DIR [--only PART ...]   # on a GPU machine (nvidia-smi present)
#   bash bench/gpu_check.sh --cpu --out DIR                # the dry run on a CPU-only machine (.venv, launch/setup.sh)
#   bash bench/gpu_check.sh --fetch-wheels                 # here, with a registry: fill .whl for a machine without one
#
# On a GPU machine it keeps the torch that is there when it is a CUDA build (pip is given `torch==<that version>` as a
# constraint, so nothing can replace it; the project itself is not pip-installed: it runs from this checkout through
# PYTHONPATH, so its `torch==2.13.0` pin never reaches pip). It installs the other pins (pyproject.toml) and what they
# need: from .whl (or $DPO_DIST_WHEELS) when that folder has files, else from the package registry. Only with no torch
# at all does it install the pinned torch (the registry's Linux build of torch is the CUDA one).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHEELS="${DPO_DIST_WHEELS:-$ROOT/.whl}"

install=1
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    --help|-h|--list|--requirements|--check-install) install=0 ;;
  esac
done
args=()
for a in "$@"; do [ "$a" = "--no-install" ] || args+=("$a"); done

if [ "${1:-}" = "--fetch-wheels" ]; then
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  exec "$PY" bench/gpu_check.py --fetch-wheels "${2:-$WHEELS}" "${@:3}"
fi

if command -v nvidia-smi >/dev/null 2>&1 && [[ " $* " != *" --cpu "* ]]; then
  PY="${PYTHON:-python3}"  # the machine's own Python, with its CUDA torch
  if [ "$install" = 1 ]; then
    t0=$(date +%s)
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
      torch_pin=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
      echo "gpu_check.sh: no CUDA torch for $PY: installing torch==$torch_pin from the registry"
      "$PY" -m pip install -q "torch==$torch_pin" || { echo "gpu_check.sh: could not install torch" >&2; exit 2; }
    fi
    # the installed distribution's version (torch.__version__ may carry a +cuXXX that its metadata does not)
    torch_v=$("$PY" -c "from importlib.metadata import version; print(version('torch'))")
    if "$PY" bench/gpu_check.py --check-install >/dev/null 2>&1; then
      echo "gpu_check.sh: every pinned package already installed; torch $torch_v kept"
    else
      tmp=$(mktemp -d)
      echo "torch==$torch_v" > "$tmp/constraints.txt"  # pip may not replace the machine's CUDA torch
      "$PY" bench/gpu_check.py --requirements > "$tmp/requirements.txt"
      src=()
      if [ -d "$WHEELS" ] && [ -n "$(ls -A "$WHEELS" 2>/dev/null)" ]; then
        src=(--no-index --find-links "$WHEELS")
        echo "gpu_check.sh: installing the pins but torch from $WHEELS (torch $torch_v kept)"
      else
        echo "gpu_check.sh: installing the pins but torch from the registry (torch $torch_v kept)"
      fi
      # deepspeed ships a source archive only: built here, against this torch, without prebuilt ops
      DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation "${src[@]}" \
        -c "$tmp/constraints.txt" -r "$tmp/requirements.txt" 2>&1 | grep -v "is ignored" \
        | grep -v "WARNING: Running pip as the 'root' user"
      if ! missing=$("$PY" bench/gpu_check.py --check-install); then
        echo "gpu_check.sh: the install did not complete: $missing (a machine without a registry needs them in" \
             "$WHEELS: bash bench/gpu_check.sh --fetch-wheels where one is reachable, then carry .whl)" >&2
        exit 2
      fi
      echo "gpu_check.sh: installed in $(( $(date +%s) - t0 )) s; torch $torch_v kept"
    fi
  fi
else
  PY="${PYTHON:-$ROOT/.venv/bin/python}"
  if [ "$install" = 1 ] && [ ! -x "$PY" ]; then
    bash launch/setup.sh || exit 2  # a CPU machine: the project's own pinned install into .venv
  fi
fi
exec "$PY" bench/gpu_check.py "${args[@]}"
