"""PNG plots of a sweep: accuracy and latency against the average visual tokens per layer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_sweep(results: list[dict], out_dir: str | Path) -> list[Path]:
    """Write accuracy_vs_tokens.png and latency_vs_tokens.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict]] = defaultdict(list)
    for row in results:
        series[row["plan"]].append(row)
    paths = []
    for key, label, name in (("accuracy", "accuracy", "accuracy_vs_tokens.png"),
                             ("prefill_ms", "prefill latency per example (ms)", "latency_vs_tokens.png")):
        if any(r.get(key) is None for r in results):  # not measured (vLLM rows have no prefill latency)
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for plan, rows in sorted(series.items()):
            rows = sorted(rows, key=lambda r: r["avg_visual_tokens"])
            xs, ys = [r["avg_visual_tokens"] for r in rows], [r[key] for r in rows]
            if plan == "none":
                ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=f"unpruned ({xs[0]:.0f} tokens)")
            else:
                ax.plot(xs, ys, marker="o", label=plan)
        ax.set_xlabel("average visual tokens per layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
