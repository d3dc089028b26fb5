"""Driver for test_families.py: the plugin under tensor parallelism on the CPU engine.

    .venv-vllm/bin/python -m tests.integrations.serving.drive_tp '{"sizes": [1, 2], "n": 20}'

Runs tiny-llava with divprune@pre:64 on `n` synthetic eval questions once per tensor-parallel
size, one engine after another. vLLM's CPU workers bind their OpenMP threads to NUMA nodes by
default and refuse two workers on one node ("Not enough allowed NUMA nodes to bind threads of 2
local CPUWorkers"); VLLM_CPU_OMP_THREADS_BIND="0|1" binds worker i to core i instead.
Prints one JSON line last: per size, the answers and the prompt lengths.
"""

from __future__ import annotations

import gc
import json
import os
import sys

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    sizes = args.get("sizes", [1, 2])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(max(sizes))))

    from pruneware.evals.synthetic import make_split
    from pruneware.integrations.vllm.offline import build_llm, greedy_answers, image_requests

    items = make_split("eval", args.get("n", 20), seed=0)
    out = {}
    for size in sizes:
        llm = build_llm(args.get("model", "tiny-llava"), args.get("plan", "divprune@pre:64"), tensor_parallel_size=size)
        texts, lengths = greedy_answers(llm, image_requests(llm, items), max_tokens=3)
        out[str(size)] = {"texts": texts, "prompt_lengths": lengths}
        del llm
        gc.collect()
    print(json.dumps(out))
