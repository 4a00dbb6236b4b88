#!/usr/bin/env bash
# GPU checks for a short device lease (< 5 minutes): the `gpu` tests, then the patching
# benchmark on a tiny model in fp32 and bf16 on CUDA, with patches/s and peak device memory.
#   bash bench/gpu_check.sh        (from the repository root, in the project's environment)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
$PY -m pytest -m gpu -q tests/gpu 2>&1 | tail -5
for dtype in float32 bfloat16; do
  echo "== patching benchmark, cuda, $dtype"
  $PY bench/patching.py --device cuda --dtype "$dtype" --sample 200 2>&1 | grep -v Warning | tail -7
done
