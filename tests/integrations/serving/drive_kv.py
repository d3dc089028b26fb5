"""Driver run inside the vLLM venv: the KV-cache manager's own block counts under an in-LLM plan.

    python -m tests.integrations.serving.drive_kv '{"model": "tiny-llava", "plan": "random@4:0.25", "n": 4}'

Runs one engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the scheduler is
reachable), submits `n` synthetic questions together, steps the engine until every prompt is
prefilled, and prints one JSON line: the KV-cache groups (layer names, spec class, level), the
blocks each request holds in each group right after its prefill, its prompt length, the block
size, the block pool's peak usage, each request's image placeholder count, and the greedy answers
(max_tokens tokens). "sizes" resizes the images (cycled), so requests of one batch differ.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams

    from pruneware.evals.synthetic import make_split
    from pruneware.evals.synthetic.accuracy import normalize
    from pruneware.integrations.vllm.offline import build_llm, image_requests

    args = json.loads(sys.argv[1])
    items = make_split("eval", args["n"], seed=args.get("split_seed", 0))
    sizes = args.get("sizes")  # [[width, height], ...] cycled over the items: images of different sizes
    for i, item in enumerate(items if sizes else ()):
        item.image = item.image.resize(tuple(sizes[i % len(sizes)]))
    llm = build_llm(args["model"], args["plan"], seed=args.get("seed", 0), **args.get("engine", {}))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager
    groups = [{"layers": g.layer_names, "spec": type(g.kv_cache_spec).__name__,
               "level": getattr(g.kv_cache_spec, "level", 0)} for g in manager.kv_cache_config.kv_cache_groups]
    params = SamplingParams(max_tokens=args.get("max_tokens", 3), temperature=0.0)
    requests = image_requests(llm, items)
    for i, request in enumerate(requests):
        engine.add_request(str(i), request, params)
    blocks: dict[str, list[int]] = {}
    usage = 0.0
    texts: dict[str, str] = {}
    prompt_lengths: dict[str, int] = {}
    visual: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for rid, req in list(scheduler.requests.items()):
            name = rid.split("-")[0]  # vLLM suffixes the id given to add_request
            if name not in blocks and req.num_computed_tokens >= req.num_prompt_tokens:
                blocks[name] = [len(b) for b in manager.get_block_ids(rid)]
                prompt_lengths[name] = req.num_prompt_tokens
                visual[name] = sum(f.mm_position.get_num_embeds() for f in req.mm_features)
        usage = max(usage, manager.usage)
        for out in outputs:
            if out.finished:
                texts[out.request_id.split("-")[0]] = normalize(out.outputs[0].text)
    order = [str(i) for i in range(len(requests))]
    print(json.dumps({
        "groups": groups, "block_size": manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
        "blocks": [blocks.get(r) for r in order], "prompt_lengths": [prompt_lengths.get(r) for r in order],
        "visual_tokens": [visual.get(r) for r in order],
        "peak_usage": usage, "answers": [texts.get(r) for r in order],
    }), flush=True)


if __name__ == "__main__":
    main()
