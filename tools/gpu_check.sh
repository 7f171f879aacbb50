#!/usr/bin/env bash
# The GPU check, one command, for a single-GPU machine with Python 3.12 and torch 2.11 but no
# megatron-core (the device tool's nvidia-h200 kind), in under 10 minutes:
#   (i)   one fp32 training step of a small attribute-routed MoE model (grouped and dispatch) on
#         the GPU against the same step on the CPU from the same weights and batch: loss and
#         every gradient within tolerance (tests/gpu/test_gpu_step.py, marker gpu);
#   (ii)  the same step in bf16: finite and close to fp32 (same test);
#   (iii) tools.bench_step at MoE-B and MoE-L sizes, bf16, one GPU: dense, attr-grouped,
#         attr-dispatch, token-dispatch, mcore-dense, mcore-moe, ref-dense, ref-merged; JSON and
#         Markdown into $OUT when set (else runs/gpu_check/);
#   (iv)  tools.plan's per-rank memory against the allocated peak of real bf16 steps of MoE-B
#         and MoE-L, within 20 % (tests/gpu/test_gpu_memory.py; run before (iii));
#
#   bash tools/fetch_gpu_wheels.sh          # here, once: the wheels into .whl/ (git-ignored)
#   bash tools/gpu_check.sh                 # there, with .whl carried (device tool: carry [".whl"])
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh --cpu-dry-run   # here: the same, on CPU, tiny
#
# --cpu-dry-run installs nothing, runs the GPU test's "GPU" side on the CPU
# (MEGATRON_UNI_GPU_DRY_RUN=1) and the benchmark at a tiny size on CPU, so the script is known to
# work end to end before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo "$(( $(date +%s) - START )) s"; }
status=0

if [ $DRY = 0 ]; then
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "gpu_check: no wheels in .whl/ (run tools/fetch_gpu_wheels.sh first and carry .whl)"; exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=$ROOT:/tmp/site
  "$PY" -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device'; \
print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'python', sys.version.split()[0])" || exit 2
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export MEGATRON_UNI_GPU_DRY_RUN=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  echo "gpu_check: --cpu-dry-run (no GPU: the 'GPU' side runs on the CPU, the benchmark at tiny size)"
fi
"$PY" -c "import megatron.core, megatron_uni; print('gpu_check: megatron-core', megatron.core.__version__)" || exit 2

echo "== (i)+(ii) one step GPU vs CPU (fp32), then bf16 [$(elapsed)]"
# time limits keep the whole check under 8 minutes (bench_step rewrites its JSON/Markdown after
# every variant, so a run cut short keeps its rows)
LIMIT_TEST=120 LIMIT_MEMORY=100 LIMIT_BASE=130 LIMIT_LARGE=190
[ $DRY = 1 ] && LIMIT_TEST=300 LIMIT_MEMORY=200 LIMIT_BASE=300
timeout $LIMIT_TEST "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu/test_gpu_step.py 2>&1 \
    | tee "$OUTDIR/gpu_step.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== (iv) planned vs allocated memory, MoE-B and MoE-L [$(elapsed)]"
timeout $LIMIT_MEMORY "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu/test_gpu_memory.py 2>&1 \
    | tee "$OUTDIR/gpu_memory.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

VARIANTS=dense,attr-grouped,attr-dispatch,token-dispatch,mcore-dense,mcore-moe,ref-dense,ref-merged
MOE="moe.num_experts=8 moe.topk=2 moe.router=attribute train.precision=bf16 model.drop_path_rate=0.0"
if [ $DRY = 0 ]; then
  # 224 px: 196 patches + a 29-token caption + its slots per row; 36 rows = 32 images + 4 rows
  # of vocabulary targets (9,216 tokens per step)
  SIZES="base:configs/models/uniperceiver_base.yaml large:configs/models/uniperceiver_large.yaml"
  SHAPE="--rows 36 --seq-len 256 --steps 10 --warmup 3"
  TINY=""
else
  SIZES="base:configs/models/uniperceiver_base.yaml"
  SHAPE="--rows 9 --seq-len 24 --steps 1 --warmup 1"
  TINY="model.hidden_size=64 model.num_layers=2 model.num_attention_heads=4 model.ffn_hidden_size=128 model.image_size=32"
fi
for item in $SIZES; do
  name=${item%%:*}; config=${item#*:}
  echo "== (iii) bench_step MoE-$name [$(elapsed)]"
  limit=$LIMIT_BASE; [ "$name" = large ] && limit=$LIMIT_LARGE
  # shellcheck disable=SC2086
  timeout $limit "$PY" -m tools.bench_step --config "$config" --variants $VARIANTS $SHAPE \
      --json "$OUTDIR/bench_$name.json" --markdown "$OUTDIR/bench_$name.md" $MOE $TINY \
      2>&1 | tee "$OUTDIR/bench_$name.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED) in $(elapsed); results in $OUTDIR"
exit $status
