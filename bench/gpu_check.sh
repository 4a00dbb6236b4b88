#!/usr/bin/env bash
# GPU checks for one short device lease (under 10 minutes on one H200): the `gpu` tests, then the
# patching benchmark in bf16 at real shapes (Qwen3-0.6B whole, Llama-3.1-8B and Qwen3-8B cut to
# 4 layers): patches/s against one forward per patch, the engine's fraction of the measured bf16
# matmul rate, peak device memory, and the projected time of a resid_pre sweep of 1,000 16-line
# programs over every layer and position of Qwen3-0.6B; then attribution against exact patching
# at the Qwen3-0.6B shape on CUDA (cells/s, and what each AtP* correction costs).
#   bash bench/gpu_check.sh        (from the repository root, in the project's environment)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
timeout 120 $PY -m pytest -m gpu -q tests/gpu 2>&1 | tail -5
echo "== patching benchmark, cuda, bfloat16, real shapes"
timeout 420 $PY bench/patching.py --device cuda --dtype bfloat16 --no-tiny --programs 20 \
  --head-layers 4 --sample 40 --seed-sample 5 --model-config all 2>&1 \
  | grep -v -i "warning\|loading weights" | tail -40
echo "== attribution benchmark, cuda, bfloat16, Qwen3-0.6B"
timeout 240 $PY bench/attribution.py --device cuda --dtype bfloat16 --programs 4 2>&1 \
  | grep -v -i "warning\|loading weights" | tail -10
