#!/usr/bin/env bash
# The accelerator benchmark (benchmarks/accelerator.py) on a GPU/TPU machine as it comes: its own python3
# (with JAX for its accelerator, Flax, Optax, Orbax, absl-py, PyYAML), this repository on PYTHONPATH, no
# virtualenv, no package registry. The few pure-Python wheels such an image lacks (ml-collections) are
# downloaded beforehand, where pip reaches a registry, by `make device-wheels` into device_wheels/, which
# travels with the working tree; they are installed here with pip --no-index into a temporary folder.
#
#   benchmarks/device_run.sh [--out DIR] [--quick] [--budget-s S]
#
# Writes DIR/accelerator.json and DIR/accelerator.md (rewritten after every row: a run cut short keeps what
# it measured) and DIR/log.txt (everything printed). DIR is $OUT when set, else --out. PYTHON and
# DEVICE_WHEELS choose another interpreter and wheel folder (the tests use a virtualenv's python).
set -euo pipefail
cd "$(dirname "$0")/.."

out='' args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:-}; shift $(( $# > 1 ? 2 : 1 ));;
    --out=*) out=${1#--out=}; shift;;
    *) args+=("$1"); shift;;
  esac
done
out=${OUT:-$out}
if [ -z "$out" ]; then
  echo 'device_run.sh: say where the results go: --out DIR (or set OUT).' >&2
  exit 2
fi
mkdir -p "$out"
python=${PYTHON:-python3}
wheels=${DEVICE_WHEELS:-device_wheels}

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
else
  echo "device_run.sh: no wheels in $wheels/ (make device-wheels, then carry it); using what $python has." >&2
fi
export PYTHONPATH="$PWD:$PWD/benchmarks:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# A rerun on the same machine loads the programs it compiled (its 'compile s' column is then a cache read).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/bw_jax_compilation_cache}

"$python" benchmarks/accelerator.py --out "$out" ${args[@]+"${args[@]}"} 2>&1 | tee "$out/log.txt"
