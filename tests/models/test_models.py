"""Embedded tiny models: building, offline loading, and accuracy of the shipped weights."""

from __future__ import annotations

import pytest
import torch

from pruneware import models
from pruneware.evals.synthetic import evaluate, fixed_examples, make_split
from pruneware.evals.synthetic.accuracy import build_prompt
from pruneware.models.build import build_processor

NAMES = sorted(models.MODELS)
BAR_OVERALL, BAR_TASK = 0.90, 0.80
# The bar is measured on 1000 questions, as the issue that set it defines it. A shipped model
# below the bar is marked here with its measured accuracy (on `make_split("eval", 1000,
# seed=2024)`) instead of lowering the bar.
BELOW_BAR: dict[str, str] = {}
# tiny-llava passes on this split: 0.957 overall, counting 0.815 (attribute 1.000, existence 0.995,
# glyph 0.980, spatial 0.995); weights fingerprint 8d673b1c28d11019 (joint29, see its card).
# tiny-qwen2.5-vl passes on this split: 0.966 overall, counting 0.865 (attribute 0.995, existence
# 1.000, glyph 0.975, spatial 0.995); weights fingerprint dc4c2cc7c75c8167 (joint10, see its card).
# Models that miss more than one of the eight hand-made questions (both shipped models miss none).
FIXED_BELOW_BAR: dict[str, str] = {}


@pytest.fixture(scope="module", params=list(models.ARCHS))
def tiny(request):
    return request.param, *models.build_tiny(request.param, seed=0)


def test_tiny_architectures(tiny):
    arch, model, processor = tiny
    ex = make_split("eval", 2, seed=0)
    inputs = processor(
        text=[build_prompt(processor, e.question) for e in ex], images=[e.image for e in ex],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    tok_id = model.config.image_token_index if arch == "llava" else model.config.image_token_id
    per_image = (inputs["input_ids"] == tok_id).sum(1).tolist()
    assert per_image == ([576, 576] if arch == "llava" else [256, 256])
    assert model.config.text_config.num_hidden_layers >= 8
    assert len(model.model.language_model.layers) >= 8
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_prompt_matches_chat_template(name):
    processor = build_processor(models.MODELS[name])
    q = "what color is the star?"
    assert models.prompt(name, q) == build_prompt(processor, q)


def test_tiny_processor_round_trips_offline(tmp_path):
    from transformers import AutoProcessor

    processor = build_processor("qwen2.5-vl")
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    q = models.prompt("tiny-qwen2.5-vl", "is there a red star?")
    assert again.tokenizer(q)["input_ids"] == processor.tokenizer(q)["input_ids"]
    assert type(again).__name__ == "Qwen2_5_VLProcessor"


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*tiny-llava"):
        models.load("tiny-gpt")
    with pytest.raises(ValueError, match="valid archs"):
        models.build_tiny("llama")
    with pytest.raises(ValueError, match="valid models"):
        models.prompt("llava-1.5", "q")


def test_mrope_sections_reach_the_config_and_bad_ones_are_refused():
    model, _ = models.build_tiny("qwen2.5-vl", rope_theta=10.0, mrope=[6, 3, 3])
    assert model.config.text_config.rope_parameters["mrope_section"] == [6, 3, 3]
    assert model.config.text_config.rope_parameters["rope_theta"] == 10.0
    with pytest.raises(ValueError, match="summing to head_dim / 2 = 12"):
        models.build_tiny("qwen2.5-vl", mrope=[4, 4, 2])
    with pytest.raises(ValueError, match="qwen2.5-vl only"):
        models.build_tiny("llava", mrope=[6, 3, 3])


def test_low_rope_base_lets_mrope_tell_columns_apart():
    """The width section's fastest rotary frequency (the model's own ``inv_freq``), turned across
    the 24 cells of a row: about 0.002 rad at base 1e6 with sections 4,4,4 (columns
    indistinguishable), 4.1 rad with the default, base 1000 and sections 1,2,9."""

    def width_turn(**llm) -> float:
        model, _ = models.build_tiny("qwen2.5-vl", **llm)
        t, h, _ = model.config.text_config.rope_parameters["mrope_section"]
        return float(model.model.language_model.rotary_emb.inv_freq[t + h] * 23)

    assert width_turn(rope_theta=1e6, mrope=[4, 4, 4]) < 0.01  # the config before 2026-12-02
    assert width_turn() > 3.0  # qwen2.5-vl's default now (base 1000, sections 1, 2, 9)


def test_tiny_evaluate_runs(tiny):
    _, model, processor = tiny
    res = evaluate(model, processor, make_split("eval", 5, seed=1), batch_size=3)
    assert res["n"] == 5 and len(res["predictions"]) == 5 and 0.0 <= res["accuracy"] <= 1.0


# --- shipped weights -------------------------------------------------------------------


def _shipped(name: str):
    if name not in models.available():
        pytest.skip(f"{name} has no trained weights in this checkout")
    return models.load(name)


def _below_bar(names: list[str], below: dict[str, str] = BELOW_BAR) -> list:
    """``names`` as params, a strict xfail on those listed in ``below``."""
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=below[n])) if n in below else n
        for n in names
    ]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_loads_offline_and_answers_one_word(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = _shipped(name)
    assert model.training is False
    examples = fixed_examples()[:3]
    res = evaluate(model, processor, examples, batch_size=3)
    vocab = set(processor.tokenizer.get_vocab())
    assert all(p in vocab for p in res["predictions"]), res["predictions"]


@pytest.mark.parametrize("name", _below_bar(NAMES, FIXED_BELOW_BAR))
def test_shipped_model_answers_fixed_questions(name):
    model, processor = _shipped(name)
    examples = fixed_examples()
    res = evaluate(model, processor, examples, batch_size=8)
    wrong = [(e.question, p) for e, p in zip(examples, res["predictions"]) if p != e.answer]
    assert len(wrong) <= 1, f"{name} got {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_processor_pads_left_when_loaded_with_plain_transformers(name):
    """Batched generation needs left padding; a training snapshot once saved a right-padding tokenizer."""
    if name not in models.available():
        pytest.skip(f"{name} has no trained weights in this checkout")
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(models.path(name)).tokenizer
    batch = tok(["is there a red circle?", "how many red objects are there?"], padding=True, return_tensors="pt")
    assert tok.padding_side == "left"
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_are_small_safetensors(name):
    if name not in models.available():
        pytest.skip(f"{name} has no trained weights in this checkout")
    folder = models.path(name)
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    assert models.card(name).startswith("# ")


@pytest.mark.slow
@pytest.mark.parametrize("name", _below_bar(NAMES))
def test_shipped_model_accuracy_bar(name):
    model, processor = _shipped(name)
    res = evaluate(model, processor, make_split("eval", 1000, seed=2024), batch_size=25)
    low = {t: a for t, a in res["per_task"].items() if a < BAR_TASK}
    assert res["accuracy"] >= BAR_OVERALL and not low, f"{name}: {res['accuracy']:.3f} overall, low {low}"


def test_run_answers_the_bundled_sample_with_and_without_pruning():
    """The main job (`pruneware run`, default model and plan) answers the showcase question."""
    import json

    from typer.testing import CliRunner

    from pruneware.cli import app
    from pruneware.cli.common import sample

    if "tiny-llava" not in models.available():
        pytest.skip("tiny-llava has no trained weights in this checkout")
    result = CliRunner().invoke(app, ["run", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    want = sample()["answer"]
    assert out["model"] == "tiny-llava" and out["question"] == sample()["question"]
    assert out["unpruned"]["answer"] == want and out["pruned"]["answer"] == want, out
    assert out["pruned"]["kept_per_stage"][0] < out["unpruned"]["visual_tokens"]
