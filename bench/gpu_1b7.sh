#!/usr/bin/env bash
# The bloom-1b7 shape on a lent GPU machine (H100/H200, one node, 8 or 1 GPUs), in one prepared run:
#   1. kit doctor on every GPU (NVML health read, NCCL all-reduce, the layout's tensor-group and
#      pipeline-neighbour links), at the training run's recipe;
#   2. bf16 matmul TFLOP/s of GPU 0;
#   3. NCCL all-reduce bus bandwidth over all GPUs (nccl-tests' formula; skipped on one GPU);
#   4. a short bloom-1b7-shaped training run (`kit train`) at the layout bench/gpu_1b7.py chooses
#      (one GPU: TP1 PP1; several: the fastest fitting TP/PP layout by kit's performance model; LAYOUT=T,P
#      forces one), printing tokens/s, TFLOP/s and MFU.
# Everything lands as JSON under $OUT (default bench/results/gpu_1b7), combined in $OUT/gpu_1b7.json.
# It needs torch with CUDA, DeepSpeed, transformers and the kit's dependencies on the machine (no network
# there). Each part is bounded by `timeout` and a failed part does not stop the others (its rc is recorded).
#   bash bench/gpu_1b7.sh --dry-run     # on any machine: the plan (layout, recipe, commands), nothing run
#   bash bench/gpu_1b7.sh               # on the GPU machine
# Knobs: GPUS (default: what `nvidia-smi -L` lists), STEPS (20), LAYOUT (T,P), WORK (/tmp/kit-gpu-1b7),
# TRAIN_TIMEOUT (420 s); for the CPU smoke test only: ALLOW_CPU=1, BENCH_RECIPE (another recipe's shape).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_1b7}
WORK=${WORK:-/tmp/kit-gpu-1b7}
STEPS=${STEPS:-20}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-420}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
if [[ -z "${GPUS:-}" ]]; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
if [[ "$GPUS" -ge 8 ]]; then GPUS=8; elif [[ "$GPUS" -ge 2 && "${ALLOW_CPU:-0}" == 1 ]]; then :;
elif [[ "$GPUS" -ge 1 ]]; then GPUS=1; else
    [[ $DRY == 1 ]] && GPUS=8 || { echo "gpu_1b7: nvidia-smi lists no GPU; set GPUS or use --dry-run" >&2; exit 2; }
fi
mkdir -p "$OUT" "$WORK"
echo "gpu_1b7: $GPUS x ${GPU_NAME:-unknown GPU}, $STEPS steps, out $OUT" >&2

if [[ $DRY == 1 ]]; then
    $PY bench/gpu_1b7.py plan --gpus "$GPUS" --gpu-name "$GPU_NAME" --steps "$STEPS" --dry-run ${LAYOUT:+--layout "$LAYOUT"} \
        ${BENCH_RECIPE:+--recipe "$BENCH_RECIPE"}
    exit 0
fi
if [[ "${ALLOW_CPU:-0}" != 1 ]]; then  # ALLOW_CPU=1: the CPU smoke test of this script (tests/test_gpu_bench.py)
    $PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("torch", torch.__version__, torch.version.cuda)'
fi
$PY -c 'import kit.tools.doctor' 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e .
$PY bench/gpu_1b7.py plan --gpus "$GPUS" --gpu-name "$GPU_NAME" --steps "$STEPS" --write "$WORK" \
    ${LAYOUT:+--layout "$LAYOUT"} ${BENCH_RECIPE:+--recipe "$BENCH_RECIPE"} > "$OUT/plan.json"
RUN_DIR=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_dir"])' "$OUT/plan.json")
rm -rf "$RUN_DIR"
declare -A RC

part() {  # part NAME TIMEOUT CMD...: stdout to $OUT/NAME.json, stderr to $OUT/NAME.log, rc remembered
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" || rc=$?
    RC[$name]=$rc
    echo "gpu_1b7: $name rc=$rc in $((SECONDS - t0)) s" >&2
}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS")

nvidia-smi -q -d ECC,ROW_REMAPPER,PAGE_RETIREMENT > "$OUT/nvidia_smi.txt" 2>&1 || true
# every rank prints its report: torchrun writes each rank's stdout to its own file; rank 0's is kept
rm -rf "$WORK/doctor_logs"
part doctor_run 180 "${TORCHRUN[@]}" --log-dir "$WORK/doctor_logs" --redirects 1 -m kit.tools.cli doctor \
    "$WORK/recipe.toml" --json
find "$WORK/doctor_logs" -path '*/attempt_0/0/stdout.log' -exec cp {} "$OUT/doctor.json" \; || true
part matmul 120 "$PY" bench/gpu_1b7.py matmul
if [[ "$GPUS" -gt 1 ]]; then
    part allreduce 180 "${TORCHRUN[@]}" bench/gpu_1b7.py allreduce
else
    echo '{"skipped": "one GPU: no NCCL link to measure (busbw is 0 by definition)"}' > "$OUT/allreduce.json"
fi
t0=$SECONDS
timeout "$TRAIN_TIMEOUT" "$PY" -m kit.tools.cli train "$WORK/recipe.toml" > "$OUT/train.log" 2>&1 || RC[train_run]=$?
echo "gpu_1b7: train rc=${RC[train_run]:-0} in $((SECONDS - t0)) s" >&2
part train 60 "$PY" bench/gpu_1b7.py summary "$RUN_DIR"
cp "$RUN_DIR/ledger/"*.jsonl "$OUT/" 2>/dev/null || true
rm -rf "$RUN_DIR/checkpoints"  # ~20 GB of optimizer state nobody needs
$PY bench/gpu_1b7.py combine "$OUT" > "$OUT/gpu_1b7.json"
for k in "${!RC[@]}"; do echo "rc $k=${RC[$k]}"; done > "$OUT/rc.txt"
cat "$OUT/gpu_1b7.json"
