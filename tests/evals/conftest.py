"""Keep the `datasets` library offline and its cache in a temporary folder during these tests."""

from __future__ import annotations

import os

import pytest

# Read by huggingface_hub and datasets when they are imported: nothing here may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def hf_datasets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """The `datasets` module, with its cache under pytest's tmp folder; skips if not installed."""
    datasets = pytest.importorskip("datasets", reason="the `eval` extra (datasets) is not installed")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
    datasets.disable_progress_bars()
    return datasets
