#!/usr/bin/env bash
# The training side's check for a GPU machine: torch only (no minari, gymnasium or MuJoCo; no network), about
# 3-5 minutes. Run from the repository root:
#
#     benchmarks/device_check.sh              # CUDA: what a GPU machine can check
#     DEVICE=cpu benchmarks/device_check.sh   # the same steps on the CPU (what any machine can check)
#
# 1. updates/s of every algorithm at its defaults on synthetic batches (benchmarks/update_speed.py --device,
#    one fresh process per figure, medians of ROUNDS rounds; FLOPs per update and the device's matmul rate)
# 2. the device tests: every algorithm updates with its data and batches on the device and no host
#    synchronisation in the step (CUDA's sync debug mode raises on one), and a checkpoint resumes bit-exactly
#    (deterministic kernels; CUBLAS_WORKSPACE_CONFIG set here); on CUDA also the batched critics against the
#    CPU's per-member path (pytest -m cuda tests/training/test_device.py)
#
# Results: benchmarks/results/device_check_$DEVICE.{md,json} (speeds) and device_check_$DEVICE.log (tests).
# Without an installed batchrl (a bare GPU machine) the package is mapped from this checkout through a
# temporary folder of links. The server's onnxruntime CUDA provider is not checked here.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
ROUNDS="${ROUNDS:-3}"
PYTHON="${PYTHON:-python3}"
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
if ! "$PYTHON" -c "import batchrl.training" 2>/dev/null; then
    shim="$(mktemp -d)"
    mkdir "$shim/batchrl"
    ln -s "$PWD"/batchrl/*.py "$shim/batchrl/"
    for part in training serving protos; do ln -s "$PWD/$part" "$shim/batchrl/$part"; done
    export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export CUBLAS_WORKSPACE_CONFIG=:4096:8 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
status=0
"$PYTHON" - <<PY || status=1
import torch
print(f"torch {torch.__version__}; device {'$DEVICE'}:",
      torch.cuda.get_device_name(0) if '$DEVICE'.startswith('cuda') else 'cpu')
PY
echo "== updates/s on $DEVICE"
"$PYTHON" -m benchmarks.update_speed --device "$DEVICE" --no-peer --no-compile --rounds "$ROUNDS" \
    --out "device_check_$DEVICE" --note "benchmarks/device_check.sh" | tail -n 12 || status=1
echo "== device tests on $DEVICE"
marker="cuda"; [ "$DEVICE" = cpu ] && marker="not cuda"
"$PYTHON" -m pytest -q -p no:cacheprovider -m "$marker" tests/training/test_device.py 2>&1 \
    | tee "$RESULTS/device_check_$DEVICE.log" | tail -n 5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== device check on $DEVICE: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
