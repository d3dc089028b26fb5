#!/usr/bin/env bash
# One device run for issue 6: the gather and score kernel tests on CUDA, then the GPU suite.
# Everything lands in $OUT (env.txt, kernel_tests.txt, gpu_suite.txt, gpu_suite.json, status.txt).
# Budget: kernel tests <= 150 s, suite <= 380 s (it aims at under 6 minutes): run with a
# 590 s limit, e.g.  run(command="bash benchmarks/device_check.sh", timeout_s=590).
set -u
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # import pruneware from this tree, installed or not
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
fi
status() { echo "$1" | tee -a "$OUT/status.txt"; }

{
  date -u; nvidia-smi || true
  "$PY" -c "import sys, torch, triton, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
status "python: $PY"

if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gather.py tests/kernels/test_scores.py tests/kernels/test_divprune.py \
    >"$OUT/kernel_tests.txt" 2>&1
  rc=$?
  status "kernel tests rc=$rc (tail of $OUT/kernel_tests.txt: $(tail -n 1 "$OUT/kernel_tests.txt"))"
else
  status "kernel tests not run: pytest is not installed"
fi

timeout 60 "$PY" benchmarks/divprune_select.py --groups 1 8 --dim 4096 --rounds 10 >"$OUT/divprune_select.txt" 2>&1
rc=$?
status "divprune selection rc=$rc ($(tail -n 1 "$OUT/divprune_select.txt"))"

timeout 380 "$PY" benchmarks/gpu_suite.py --json "$OUT/gpu_suite.json" --max-seconds 290 >"$OUT/gpu_suite.txt" 2>&1
rc=$?
status "gpu suite rc=$rc"
tail -n 60 "$OUT/gpu_suite.txt"
cat "$OUT/status.txt"
