"""Driver run inside the vLLM venv: greedy answers about synthetic videos (Qwen), one engine per plan.

    python -m tests.integrations.serving.drive_video '{"model": "tiny-qwen2.5-vl", "plans": ["none"], "n": 8}'

A video is `video_frames(i)`: 4 frames of a synthetic scene, at `FPS`. Prints one JSON line:
{plan: {"answers": [...], "prompt_lengths": [...]}}.
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np

FPS = 2.0
FRAMES = 4


def video_frames(item) -> np.ndarray:
    """[FRAMES, H, W, 3] uint8: the item's image, drifting one pixel column per frame."""
    image = np.asarray(item.image.convert("RGB"))
    return np.stack([np.roll(image, shift, axis=1) for shift in range(FRAMES)])


def video_prompt(processor, question: str) -> str:
    from pruneware.integrations.vllm.offline import chat_prompt

    return chat_prompt(processor, question).replace("<|image_pad|>", "<|video_pad|>")


def main() -> None:
    from transformers import AutoProcessor

    from pruneware.evals.synthetic import make_split
    from pruneware.evals.synthetic.accuracy import normalize
    from pruneware.integrations.vllm.offline import build_llm, greedy_answers

    args = json.loads(sys.argv[1])
    items = make_split("eval", args["n"], seed=0)
    out = {}
    for plan in args["plans"]:
        llm = build_llm(args["model"], plan, limit_mm_per_prompt={"video": 1, "image": 0})
        processor = AutoProcessor.from_pretrained(llm.llm_engine.model_config.model)
        meta = {"fps": FPS, "duration": FRAMES / FPS, "total_num_frames": FRAMES, "frames_indices": list(range(FRAMES)),
                "video_backend": "opencv", "do_sample_frames": False}
        # The embedded model's chat template knows images only: its image prompt with the video pad.
        requests = [{"prompt": video_prompt(processor, it.question),
                     "multi_modal_data": {"video": (video_frames(it), meta)}} for it in items]
        texts, lengths = greedy_answers(llm, requests, max_tokens=3)
        out[plan] = {"answers": [normalize(t) for t in texts], "prompt_lengths": lengths}
        del llm
        gc.collect()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
