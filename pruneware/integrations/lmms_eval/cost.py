"""The pruning cost of every lmms-eval request, and its summary beside lmms-eval's results.

Per request: the visual tokens each decoder layer processed, the visual tokens kept by each
stage, the average visual tokens per layer, and the language model's prefill FLOPs with and
without pruning (estimates, see `pruneware.report`).

Where it goes:
- `<output_path>/<model>/pruneware_cost_<time>.json`, the folder where lmms-eval writes
  `<date>_results.json` (`--output_path`; `<model>` is lmms-eval's sanitised `pretrained`), or
  the path given as `cost_file=` in `--model_args`. It holds `summary` and `requests`. Run
  without `--output_path` (or from Python), no file is written unless `cost_file=` is given.
- The summary's means also go through lmms-eval's throughput log, so lmms-eval's own results
  JSON carries them under `throughput`: `avg_pruneware_visual_tokens`,
  `avg_pruneware_flops_ratio`, `avg_pruneware_requests`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pruneware.report import Report, lm_flops_per_sample


@dataclass
class CostLog:
    """Per-request cost records of one lmms-eval model instance."""

    plan: str
    model: str
    requests: list[dict] = field(default_factory=list)

    def record_batch(self, keys: list[dict], report: Report | None, attention_mask: torch.Tensor,
                     visual: list[int], text_config) -> None:  # fmt: skip
        """Add one record per sample of a generate call.

        keys: per sample, what identifies the request (task, doc_id, round).
        report: the prefill's report, or None when nothing was pruned.
        attention_mask: [B, L], the unpruned prompt's mask. visual: per sample, its visual tokens.
        """
        n_layers = text_config.num_hidden_layers
        tokens = attention_mask.sum(1).tolist()
        unpruned = lm_flops_per_sample([tokens] * n_layers, text_config)
        for b, key in enumerate(keys):
            per_layer = [visual[b]] * n_layers
            stages = []
            for stage in report.stages if report is not None else []:
                start = 0 if stage.where == "pre" else int(stage.where)
                per_layer[start:] = [stage.n_after[b]] * (n_layers - start)
                stages.append({"where": stage.where, "policy": stage.policy, "kept": stage.n_after[b],
                               "of": stage.n_before[b]})  # fmt: skip
            flops = report.flops_per_sample[b] if report is not None else unpruned[b]
            self.requests.append({
                **key, "visual_tokens": visual[b], "stages": stages, "visual_per_layer": per_layer,
                "avg_visual_tokens": round(sum(per_layer) / n_layers, 3),
                "lm_flops": flops, "lm_flops_unpruned": unpruned[b],
                "flops_ratio": round(flops / unpruned[b], 6) if unpruned[b] else 1.0,
            })

    def summary(self) -> dict:
        """Means over requests (and FLOP totals): what goes beside the score."""
        n = len(self.requests)
        if not n:
            return {"plan": self.plan, "model": self.model, "requests": 0}
        flops = sum(r["lm_flops"] for r in self.requests)
        unpruned = sum(r["lm_flops_unpruned"] for r in self.requests)
        return {
            "plan": self.plan, "model": self.model, "requests": n,
            "avg_visual_tokens": round(sum(r["avg_visual_tokens"] for r in self.requests) / n, 3),
            "avg_visual_tokens_unpruned": round(sum(r["visual_tokens"] for r in self.requests) / n, 3),
            "flops_ratio": round(flops / unpruned, 6) if unpruned else 1.0,
            "lm_flops": flops, "lm_flops_unpruned": unpruned,
        }

    def throughput_metrics(self) -> dict[str, float]:
        """The numbers handed to lmms-eval's throughput log (it prefixes them with `avg_`)."""
        s = self.summary()
        if not s["requests"]:
            return {}
        return {"pruneware_visual_tokens": s["avg_visual_tokens"], "pruneware_flops_ratio": s["flops_ratio"],
                "pruneware_requests": s["requests"]}  # fmt: skip

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": self.summary(), "requests": self.requests}, indent=1))
        return path


def default_cost_path(argv: list[str] | None = None) -> Path | None:
    """`<--output_path>/<model>/pruneware_cost_<time>.json` when this process runs lmms-eval's CLI
    with `--output_path`: the folder where lmms-eval writes `<date>_results.json`, `<model>`
    named by lmms-eval's own rule (from `--model_args`). None without `--output_path`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path")
    parser.add_argument("--model_args", default="")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not known.output_path:
        return None
    folder = Path(known.output_path)
    try:
        from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
        from lmms_eval.utils import sanitize_model_name
    except ImportError:  # lmms-eval moved them: keep the file at the output root
        pass
    else:
        folder = folder / sanitize_model_name(GeneralConfigTracker._get_model_name(known.model_args))
    return folder / f"pruneware_cost_{time.strftime('%Y%m%dT%H%M%S')}.json"
