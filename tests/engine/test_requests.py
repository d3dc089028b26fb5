"""One attached model serves concurrent calls: run-time state belongs to each request.

Several threads call `generate` on one attached model at once; every call must give exactly
what it gives when the calls run one after another, tokens and kept indices alike, for a
random, a divprune and attention-scored plans (whose captured rows must reach the right call).
"""

from __future__ import annotations

import gc
import inspect
import threading
import weakref

import pytest
import torch

import pruneware
from pruneware.engine.kv_caches import output_cache
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

THREADS = 4
ROUNDS = 3


def _requests(family: str):
    """(model, several single-sample inputs of different lengths and contents)."""
    if family == "llava":
        model = tiny_llava(layers=6)
        return model, [llava_inputs(model, [(2 + i, 1, 3 + 2 * i)], seed=i) for i in range(THREADS)]
    model = tiny_qwen(layers=6)
    grids = [(8, 8), (8, 12), (4, 8), (12, 8)]
    return model, [qwen_inputs(model, [(2 + i, [grids[i]], 3)], seed=i) for i in range(THREADS)]


def _generate(model, session, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kept = [[k.clone() for k in stage.kept] for stage in session.report.stages]
    return out.sequences, torch.stack(out.logits, 1), kept


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize(
    "plan",
    ["random@3:0.25", "divprune@pre:0.25", "fastv@2:0.5", "adaptinfer@1:0.5,adaptinfer@3:0.25", "crosslmm@pre:0.25",
     "vision-score@pre:0.3,random@4:0.5"],
)
def test_concurrent_generate_equals_sequential(family, plan):
    model, requests = _requests(family)
    session = pruneware.attach(model, plan, seed=7)
    try:
        expected = [_generate(model, session, inputs) for inputs in requests]
        results: dict[tuple[int, int], tuple] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(THREADS)

        def worker(i: int) -> None:
            try:
                barrier.wait()
                for r in range(ROUNDS):
                    results[i, r] = _generate(model, session, requests[(i + r) % THREADS])
            except BaseException as err:  # noqa: BLE001 (reported below)
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pruneware.detach(model)
    assert not errors, errors
    assert len(results) == THREADS * ROUNDS
    for (i, r), (ids, logits, kept) in results.items():
        want_ids, want_logits, want_kept = expected[(i + r) % THREADS]
        assert torch.equal(ids, want_ids)
        assert torch.equal(logits, want_logits)
        assert len(kept) == len(want_kept)
        for got_stage, want_stage in zip(kept, want_kept, strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got_stage, want_stage, strict=True))


def test_on_report_gets_every_call_and_report_is_per_thread():
    model, requests = _requests("llava")
    got: list[pruneware.Report] = []
    lock = threading.Lock()

    def on_report(report):
        with lock:
            got.append(report)

    session = pruneware.attach(model, "random@pre:0.5", on_report=on_report)
    try:
        with torch.no_grad():
            model(**requests[0])
        mine = session.report
        seen_in_thread: list = []
        thread = threading.Thread(target=lambda: seen_in_thread.append((session.report.stages, model(**requests[1]), session.report)))
        thread.start()
        thread.join()
    finally:
        pruneware.detach(model)
    before, _, theirs = seen_in_thread[0]
    assert before == []  # a new thread has completed no call yet
    assert session.report is mine  # the other thread's call did not replace this thread's report
    assert theirs is not mine and got == [mine, theirs]
    n_img = int((requests[1]["input_ids"] == model.config.image_token_id).sum())
    assert theirs.stages[0].n_before == [n_img]


def test_reentering_on_the_same_thread_raises_and_the_session_recovers():
    model, requests = _requests("llava")
    inputs = requests[0]
    with pruneware.prune(model, "random@3:0.5", seed=1) as run:
        with torch.no_grad():
            expected = model(**inputs).logits

        def nested(module, args):
            model(**inputs)  # a call of the same model from inside one of its forwards

        handle = model.model.language_model.layers[1].register_forward_pre_hook(nested)
        try:
            with pytest.raises(RuntimeError, match="session re-entered"), torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
        with torch.no_grad():
            again = model(**inputs).logits
        assert run.report.stages[0].n_after == [run.report.stages[0].n_before[0] // 2]
    assert torch.equal(again, expected)


def test_reports_stay_bounded_and_kept_indices_are_on_the_cpu():
    model, requests = _requests("llava")
    session = pruneware.attach(model, "divprune@pre:0.5,random@3:0.5")
    try:
        with torch.no_grad():
            model(**requests[0])
            first = weakref.ref(session.report)
            for i in range(20):
                model(**requests[i % THREADS])
                model.generate(**requests[i % THREADS], max_new_tokens=2, do_sample=False)
        gc.collect()
        assert first() is None  # an old report is not kept alive by the session
        assert not hasattr(session, "history")
        assert len(session._requests._by_cache) <= 1  # one state per live cache, freed with it
        assert all(k.device.type == "cpu" for s in session.report.stages for k in s.kept)
    finally:
        pruneware.detach(model)


def test_a_manual_decode_loop_finds_its_state_on_the_returned_cache():
    model, requests = _requests("llava")
    inputs = requests[1]
    with pruneware.prune(model, "random@3:0.5", seed=1), torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        out = model(**inputs)  # the model makes its own cache
        mask, tokens = inputs["attention_mask"], [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 / older
            out = model(input_ids=tokens[-1], attention_mask=mask, **{name: output_cache(out)})
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, 1), expected)
