"""Driver run inside the vLLM venv: greedy answers of the offline `LLM` for several plans.

    python -m tests.integrations.serving.drive_offline '{"model": "tiny-llava", "plans": ["none"], "n": 20}'

Prints one JSON line: {plan: {"answers": [...], "prompt_lengths": [...]}}. Plans run one after
another in this process, each with an engine of its own.
"""

from __future__ import annotations

import gc
import json
import sys


def main() -> None:
    from pruneware.evals.synthetic import make_split
    from pruneware.evals.synthetic.accuracy import normalize
    from pruneware.integrations.vllm.offline import build_llm, greedy_answers, image_requests

    args = json.loads(sys.argv[1])
    items = make_split("eval", args["n"], seed=args.get("split_seed", 0))
    out = {}
    for plan in args["plans"]:
        llm = build_llm(args["model"], plan, seed=args.get("seed", 0))
        texts, lengths = greedy_answers(llm, image_requests(llm, items), max_tokens=args.get("max_tokens", 3))
        out[plan] = {"answers": [normalize(t) for t in texts], "prompt_lengths": lengths}
        del llm
        gc.collect()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
