#!/usr/bin/env bash
# GPU benchmark: classifier and U-Net slices/s on the CPU and on the GPU side by side, and a check that the GPU's
# outputs (float32 and mixed_float16) agree with the CPU's within models.device.Tolerance (exit 1 if not).
# Without a usable GPU it prints the CPU column and "GPU: none visible (why)".
#   benchmarks/gpu.sh [--slices 48] [--size 512] [--repeats 3] [--phantom auto|chest|disc] [--no-mixed] [--unet-batch 32]
#   --cpu-mixed adds a CPU mixed_float16 column: checks the precision (and this check) without a GPU.
# Needs the [gpu] extra for the GPU columns (pip install -e '.[gpu]', see README "GPU"); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
else
    echo "nvidia-smi: not found"
fi
exec "$PYTHON" -m benchmarks.gpu "$@"
