#!/usr/bin/env bash
# One device run for issue 6: the gather and score kernel tests on CUDA, then the GPU suite (with
# vision-side vitK plans on the released towers' shapes, summarised in vit_ttft.txt).
# Everything lands in $OUT (env.txt, kernel_tests.txt, gpu_suite.txt, gpu_suite.json, vit_ttft.txt, status.txt).
# Budget: kernel tests <= 150 s, suite <= 380 s (it aims at under 6 minutes), then the vLLM serving
# benchmark on random-weight 7B shapes with whatever is left of 585 s (vllm_serving_*.txt/json;
# "vllm not installed" when the machine has no vllm): run with a 590 s limit, e.g.
#   run(command="bash benchmarks/device_check.sh", timeout_s=590).
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
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gather.py tests/kernels/test_scores.py tests/kernels/test_scores_cpu.py tests/kernels/test_divprune.py \
    >"$OUT/kernel_tests.txt" 2>&1
  rc=$?
  status "kernel tests rc=$rc (tail of $OUT/kernel_tests.txt: $(tail -n 1 "$OUT/kernel_tests.txt"))"
else
  status "kernel tests not run: pytest is not installed"
fi

timeout 60 "$PY" benchmarks/divprune_select.py --groups 1 8 --dim 4096 --rounds 10 >"$OUT/divprune_select.txt" 2>&1
rc=$?
status "divprune selection rc=$rc ($(tail -n 1 "$OUT/divprune_select.txt"))"

# The presets include pdrop, so FastV, AdaptInfer and PyramidDrop (the scored in-LLM stages of
# issue 34) are timed at batch 1 and 8 on the 7B shapes against their native lower bounds.
timeout 380 "$PY" benchmarks/gpu_suite.py --json "$OUT/gpu_suite.json" --max-seconds 290 \
  --presets fastv adaptinfer pdrop info-horizon crosslmm random divprune >"$OUT/gpu_suite.txt" 2>&1
rc=$?
status "gpu suite rc=$rc"
tail -n 60 "$OUT/gpu_suite.txt"
# Vision-side stages (issue 35): TTFT of vitK plans on the 7B shapes with the released towers (the
# suite's -tower entries), against the unpruned model and a pre plan at the same kept count.
"$PY" benchmarks/vit_ttft_summary.py "$OUT/gpu_suite.json" >"$OUT/vit_ttft.txt" 2>&1
status "vision-side TTFT rc=$? (table in $OUT/vit_ttft.txt)"
cat "$OUT/vit_ttft.txt"

# vLLM serving with the plugin, random weights of the real shapes (--load-format dummy; the config
# folders are written offline by benchmarks/serving_shapes.py). Each model gets the time left.
VLLM_BIN="$(dirname "$PY")/vllm"
[ -x "$VLLM_BIN" ] || VLLM_BIN="$(command -v vllm || true)"
if [ -z "$VLLM_BIN" ] || ! "$PY" -c "import vllm" 2>/dev/null; then
  status "vllm serving: vllm not installed (no vllm next to $PY or on PATH): not run"
else
  for shape in llava-1.5-7b qwen2.5-vl-7b; do
    left=$((585 - SECONDS))
    if [ "$left" -lt 150 ]; then status "vllm serving $shape: skipped, only ${left} s of the budget left"; continue; fi
    shapes=$("$PY" benchmarks/serving_shapes.py "$shape" "$(mktemp -d)/$shape")
    timeout --kill-after=20 $((left - 25)) "$PY" benchmarks/vllm_serving.py --model "$shapes" --load-format dummy \
      --vllm-bin "$VLLM_BIN" --plans none,divprune@pre:64 --concurrency 1,8,32 --requests 64 --requests-at-1 8 \
      --ready-timeout 240 --json "$OUT/vllm_serving_$shape.json" >"$OUT/vllm_serving_$shape.txt" 2>&1
    rc=$?
    status "vllm serving $shape rc=$rc (table in $OUT/vllm_serving_$shape.txt)"
  done
fi
cat "$OUT/status.txt"
