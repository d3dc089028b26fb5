#!/usr/bin/env bash
# Install vLLM for the plugin tests (tests/integrations/test_vllm*.py) into the active venv
# (`python -m pip`: the interpreter on PATH, i.e. the venv that .ci/run activates).
# Idempotent: pip skips what is already installed at these versions.
#
# vllm 0.33.0 pins torch==2.14.0, but it imports and builds its processors and models on the
# CPU with the project's torch==2.14.1, so it is installed with --no-deps, plus the light
# dependencies its import chain needs (found by trial: import, install the missing module,
# repeat). fastapi stays below 0.137 (vllm's own pin); newer fastapi needs opentelemetry.
# The CUDA kernels, flashinfer, triton extras and the serving stack are not installed.
set -euo pipefail
python -m pip install --no-deps "vllm==0.33.0"
python -m pip install --no-deps \
    "aiohappyeyeballs==2.7.1" "aiohttp==3.14.5" "aiosignal==1.4.0" "apache-tvm-ffi==0.1.11" \
    "attrs==26.1.0" "blake3==1.0.11" "cachetools==8.0.2" "cbor2==6.3.0" "cloudpickle==3.1.3" \
    "einops==0.8.2" "fastapi==0.136.3" "frozenlist==1.8.0" "jsonschema==4.26.0" \
    "jsonschema-specifications==2025.9.1" "llguidance==1.7.6" "mistral_common==1.13.1" \
    "msgspec==0.22.0" "multidict==7.2.1" "openai==3.57.0" "oss-harmony==0.0.11" \
    "partial-json-parser==0.2.1.1.post7" "prometheus_client==0.26.0" "propcache==0.5.4" \
    "psutil==7.2.2" "py-cpuinfo==9.0.0" "pybase64==1.5.1" "pycountry==26.2.16" \
    "pydantic-extra-types==2.11.1" "pyzmq==27.3.0" "referencing==0.37.0" "rpds-py==2026.9.1" \
    "sniffio==1.3.1" "starlette==1.10.0" "tiktoken==0.14.0" "uvloop==0.23.0" \
    "xgrammar==0.2.8" "yarl==1.25.1" "requests==2.34.2" "urllib3==2.8.0" "charset_normalizer==3.5.3" \
    "certifi==2026.10.19.post1"
