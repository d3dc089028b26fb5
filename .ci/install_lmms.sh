#!/usr/bin/env bash
# Install lmms-eval for the plugin tests (tests/integrations/test_lmms_eval*.py) into the active
# venv (`python -m pip`: the interpreter on PATH, i.e. the venv that .ci/run activates).
# Idempotent: pip skips what is already installed at these versions.
#
# lmms-eval 0.7.3 declares a heavy tree (wandb, sentence-transformers, spacy, timm, opencv, av,
# yt-dlp, pre-commit, ...), none of which its CLI, registry, task loader and evaluator import.
# So it is installed with --no-deps, plus the light dependencies that import chain needs (found
# by trial: run `python -m lmms_eval` end to end, install the missing module, repeat; then
# checked against the modules a full run imports). datasets and pydantic come with ".[test]".
# filelock stays below 4: lmms-eval 0.7.3's evaluator imports `filelock._api`, which filelock 4
# removed (huggingface_hub and datasets accept filelock>=3.10). chardet<7 and typepy<2 are what
# mbstrdecoder and pytablewriter require; `pip check` then reports only lmms-eval's own
# requirements that are deliberately not installed.
set -euo pipefail
python -m pip install --no-deps "lmms-eval==0.7.3"
python -m pip install --no-deps \
    "accelerate==1.15.0" "aiohappyeyeballs==2.7.1" "aiohttp==3.14.5" "aiosignal==1.4.0" \
    "attrs==26.1.0" "chardet==6.0.0.post1" "colorama==0.4.6" "DataProperty==1.1.1" "evaluate==0.4.6" \
    "filelock==3.32.7" "frozenlist==1.8.0" "loguru==0.7.3" "lxml==6.1.3" "mbstrdecoder==1.1.5" \
    "multidict==7.2.1" "pathvalidate==3.3.1" "portalocker==4.4.2" "propcache==0.5.4" \
    "psutil==7.2.2" "pytablewriter==1.2.1" "pytz==2026.6" "sacrebleu==2.6.0" "tabledata==1.3.5" \
    "tabulate==0.10.0" "tcolorpy==0.1.7" "tenacity==9.2.1" "typepy==1.3.5" "yarl==1.25.1"
