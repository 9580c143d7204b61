#!/usr/bin/env bash
# Issue 19's GPU figures in one run (at most 8.5 minutes): paper-size NDT1 and NDT2 in bf16, train step at
# batch 64/256/1024 with MFU, co-smoothing of a 668-neuron x 200-trial session, XLA's attention against cuDNN's
# fused kernel (`model.attention_impl`, without attention dropout, which only the explicit path has), and the
# float32 (TF32) step. Each benchmark has its own time limit, so one that fails or hangs leaves the others.
#
#   bash scripts/gpu_wheels.sh                       # here, once: the packages the GPU image lacks, into .whl/
#   device run: bash scripts/gpu_check.sh            # carry [".whl"], timeout_s 600; results come back in $OUT
#   SMOKE=1 bash scripts/gpu_check.sh                # the same commands, tiny, on a CPU (checks the script)
#
# Writes $OUT/<name>.json (bench's JSON) and $OUT/gpu_check.log (versions and every table).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
: > "$log"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "pip install of .whl/ failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1  # the image's JAX; ibl_jax from here

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
 python3 -c "import jax, flax, optax, orbax.checkpoint, datasets; print('jax', jax.__version__, 'flax', flax.__version__,
             'datasets', datasets.__version__, jax.devices())"
 python3 -c "import ibl_jax.bench" && echo "ibl_jax imports") 2>&1 | tee -a "$log"

if [ -n "${SMOKE:-}" ]; then  # a CPU: the small model, tiny sizes
  NDT1=configs/ndt1.py NDT2=configs/ndt2.py SIZES=8,16 ONE=16 EVAL="--eval_trials=2 --neurons=40 --eval_max_chunks=1"
  STEPS=2 LIMIT=300
else
  NDT1=configs/ndt1.py:paper NDT2=configs/ndt2.py:paper SIZES=64,256,1024 ONE=256 EVAL="--eval_trials=200 --neurons=668"
  STEPS=10 LIMIT=${LIMIT:-100}  # 4 x 100 + 2 x 50 s: inside the device's 10-minute command
fi

bench() {  # bench NAME SECONDS ARGS...: one benchmark under its own time limit
  local name=$1 seconds=$2; shift 2
  echo "== $name: python -m ibl_jax.bench $*" | tee -a "$log"
  timeout "$seconds" python3 -m ibl_jax.bench "$@" --steps="$STEPS" --out="$OUT/$name.json" >> "$log" 2>&1
  echo "== $name: exit $?" | tee -a "$log"
}
no_drop="--config.model.attention_dropout=0.0"
bench ndt1_bf16 "$LIMIT" --config="$NDT1" --dtype=bf16 --what=train,eval --sizes="$SIZES" $EVAL
bench ndt1_bf16_cudnn "$LIMIT" --config="$NDT1" --dtype=bf16 --what=train,eval --sizes="$ONE" $EVAL $no_drop \
  --config.model.attention_impl=cudnn
bench ndt1_bf16_xla_nodrop $((LIMIT / 2)) --config="$NDT1" --dtype=bf16 --what=train --sizes="$ONE" $no_drop
bench ndt2_bf16 "$LIMIT" --config="$NDT2" --dtype=bf16 --what=train,eval --sizes="${SIZES%,*}" $EVAL
bench ndt2_bf16_cudnn "$LIMIT" --config="$NDT2" --dtype=bf16 --what=train,eval --sizes="$ONE" $EVAL $no_drop \
  --config.model.attention_impl=cudnn
bench ndt1_fp32 $((LIMIT / 2)) --config="$NDT1" --dtype=fp32 --what=train --sizes="$ONE"
grep -E "^== |MFU|^ +[0-9]+ |co-smoothing|cuDNN|rror" "$log" | cut -c1-220
