"""Issue 33 item 5: a bounded soak. Many forwards, `generate` calls and sessions, sequential
and from threads on one attached model, leave live objects and tensor memory flat, every hook
removed and the outputs identical to the first round's."""

from __future__ import annotations

import contextvars
import gc
import threading

import torch
from transformers import AttentionInterface

import pruneware
from pruneware.engine.session import attached_session
from tests.tiny import llava_inputs, qwen_inputs, tiny_llava, tiny_qwen

PLANS = ("divprune@pre:0.5,random@1:0.5", "pdrop@1:0.5", "sparsevlm@1:0.5")
THREADS = 4
ROUNDS = 2


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def live() -> tuple[int, int, int]:
    """(live gc-tracked objects, live tensors, bytes of their distinct storages), after a full collect."""
    gc.collect()
    objects = gc.get_objects()
    tensors = [o for o in objects if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == "cpu"}
    return len(objects), len(tensors), sum(storages.values())


def one_round(model, requests: list[dict]) -> list[torch.Tensor]:
    """Every plan as a `prune` block (forward + generate), then one attached model serving
    THREADS threads at once; returns every output, in a fixed order."""
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for plan in PLANS:
            with pruneware.prune(model, plan, seed=4) as run:
                outputs.append(model(**requests[0]).logits)
                outputs.append(model.generate(**requests[1], max_new_tokens=2, do_sample=False))
            assert run.report.stages
        session = pruneware.attach(model, PLANS[0], seed=4)
        results: dict[int, list[torch.Tensor]] = {}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                with torch.no_grad():
                    results[i] = [model(**requests[(i + k) % len(requests)]).logits for k in range(3)]
            except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        session.detach()
        assert not errors, errors
        for i in range(THREADS):
            outputs.extend(results[i])
    return outputs


def assert_same_outputs(first: list[list[torch.Tensor]], again: list[list[torch.Tensor]]) -> None:
    for old, new in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(old, new, strict=True))


def test_soak_leaves_memory_objects_and_hooks_flat():
    torch.manual_seed(0)
    llava, qwen = tiny_llava(layers=2), tiny_qwen(layers=2)
    work = [
        (llava, [llava_inputs(llava, [(2, 1, 3)], seed=s) for s in range(3)]),
        (qwen, [qwen_inputs(qwen, [(2, [(4, 8)], 3)], seed=s) for s in range(3)]),
    ]
    with torch.no_grad():  # transformers installs its own output-capture hooks on a first forward
        for model, requests in work:
            model(**requests[0])
    hooks = [hook_count(model) for model, _ in work]
    registry = sorted(AttentionInterface._global_mapping)
    first = [one_round(model, requests) for model, requests in work]
    assert_same_outputs(first, [one_round(model, requests) for model, requests in work])  # warms lazy caches
    live()  # its first call gives every live tensor's storage a Python object, once
    before = live()
    for _ in range(ROUNDS):
        assert_same_outputs(first, [one_round(model, requests) for model, requests in work])
    after = live()
    assert after[1] <= before[1], f"live tensors grew from {before[1]} to {after[1]}"
    assert after[2] <= before[2], f"tensor bytes grew from {before[2]} to {after[2]}"
    assert after[0] - before[0] < 30, f"live objects grew from {before[0]} to {after[0]} over {ROUNDS} rounds"
    assert [hook_count(model) for model, _ in work] == hooks
    assert sorted(AttentionInterface._global_mapping) == registry
    assert all(attached_session(model) is None for model, _ in work)


def test_sessions_leave_no_context_variables_behind():
    """A session per request (`with prune(...)` in a server loop) must not grow the thread's
    context: a ContextVar per session stayed there, with its last value, forever."""
    model = tiny_llava(layers=2)
    inputs = llava_inputs(model, [(2, 1, 3)])
    with torch.no_grad():
        with pruneware.prune(model, "random@pre:0.5"):
            model(**inputs)
        before = len(contextvars.copy_context())
        for plan in PLANS:
            with pruneware.prune(model, plan):
                model(**inputs)
    assert len(contextvars.copy_context()) == before
