#!/usr/bin/env bash
# The preflight on a real GPU machine: NVML readings (count, UUID, ECC, remapped rows, Xid), the
# NCCL path of the all-reduce on one rank, the checkpoint filesystem, and (separately) versions vs
# containers/pins.toml, which a machine outside the image is expected to fail. Prepared for a device session; it needs torch with CUDA and the
# kit's dependencies already on the machine (no network there).
#   bash bench/gpu_doctor.sh            # results in ${OUT:-bench/results}/gpu_doctor.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT" /tmp/kit-gpu-doctor
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("torch", torch.__version__, torch.version.cuda)'
python3 -c 'import kit.tools.doctor' 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c 'import pynvml' 2>/dev/null || echo "warning: pynvml (nvidia-ml-py) missing: GPU checks will read na" >&2
nvidia-smi -q -d ECC,ROW_REMAPPER,PAGE_RETIREMENT > "$OUT/gpu_doctor_nvidia_smi.txt" 2>&1 || true
# One rank under torchrun, so the recipe's GPU count is enforced as on a compute node.
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kit.tools.cli doctor tiny.toml \
    --set 'run.runs_dir="/tmp/kit-gpu-doctor"' --set slurm.gpus_per_node=1 \
    --set doctor.allreduce_mib=256 --set doctor.allreduce_iters=20 --json > "$OUT/gpu_doctor.json" || rc=$?
cat "$OUT/gpu_doctor.json"
# Versions of this machine against the H100 image's pins (a bare machine is expected to differ).
python3 -m kit.tools.cli doctor --static --target h100 > "$OUT/gpu_doctor_versions.txt" || true
cat "$OUT/gpu_doctor_versions.txt"
echo "kit doctor exit status: ${rc:-0} (76 = a check failed; outside the image version drift only warns)"
