"""What a pruned prefill kept and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageReport:
    """One stage of the last prefill.

    Attributes:
        where: "pre" or the decoder layer index K.
        policy: the policy name.
        kept: per sample, a LongTensor of the original input positions of the visual tokens
            kept by this stage (sorted), on the model's device: the report brings nothing to
            the host that the prefill does not need (`.cpu()` it to read it: a device sync).
        n_before: per sample, visual tokens entering the stage.
        n_after: per sample, visual tokens leaving it.
    """

    where: str | int
    policy: str
    kept: list[torch.Tensor]
    n_before: list[int]
    n_after: list[int]


@dataclass
class Report:
    """The last prefill's pruning record.

    Attributes:
        stages: one StageReport per plan stage.
        n_layers: decoder layers of the language model.
        visual_per_layer: per layer, the mean over samples of the visual tokens it processed.
        tokens_per_layer: per layer, the mean over samples of all tokens it processed.
        lm_flops: estimated language-model prefill FLOPs for the batch (see `lm_flops`).
        lm_flops_unpruned: the same estimate without pruning.
        plan: the plan string that ran (under `avg_tokens`, the first sample with visual
            tokens; see `sample_plans`).
        sample_plans: per sample, the plan string with that sample's own budgets.
        visual_per_sample: per sample, its visual tokens averaged over layers.
        flops_per_sample: per sample, its share of `lm_flops`.
        vision_flops: per image the vision encoder ran on during this call (in the order it
            ran them), the vision side's FLOPs for the input the encoder actually received
            (see `pruneware.adapters.vision_flops`); `resize` on Qwen makes them smaller.
        below_budget: the samples (batch indices) with fewer visual tokens than `avg_tokens`
            that kept them all, under `small_images="keep"` (see `pruneware.prune`).
    """

    stages: list[StageReport] = field(default_factory=list)
    n_layers: int = 0
    visual_per_layer: list[float] = field(default_factory=list)
    tokens_per_layer: list[float] = field(default_factory=list)
    lm_flops: float = 0.0
    lm_flops_unpruned: float = 0.0
    plan: str = ""
    sample_plans: list[str] = field(default_factory=list)
    visual_per_sample: list[float] = field(default_factory=list)
    flops_per_sample: list[float] = field(default_factory=list)
    vision_flops: list[float] = field(default_factory=list)
    below_budget: list[int] = field(default_factory=list)

    @property
    def avg_visual_tokens(self) -> float:
        """Visual tokens per sample, averaged over all decoder layers."""
        return sum(self.visual_per_layer) / len(self.visual_per_layer) if self.visual_per_layer else 0.0

    @property
    def flops_ratio(self) -> float:
        return self.lm_flops / self.lm_flops_unpruned if self.lm_flops_unpruned else 1.0

    def summary(self) -> dict[str, object]:
        """A JSON-friendly digest."""
        return {
            "plan": self.plan,
            "avg_visual_tokens": round(self.avg_visual_tokens, 2),
            "lm_flops": self.lm_flops,
            "flops_ratio": round(self.flops_ratio, 4),
            "vision_flops": sum(self.vision_flops),
            "below_budget": self.below_budget,
            "stages": [
                {"where": s.where, "policy": s.policy, "n_before": s.n_before, "n_after": s.n_after}
                for s in self.stages
            ],
        }


def layer_flops(tokens: float, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """Prefill FLOPs of one decoder layer on `tokens` tokens (one sample).

    Linear layers: 2 * tokens * params (q, k, v, o projections and a gated MLP).
    Attention: causal QK^T and PV, 2 * 2 * tokens^2 / 2 * heads * head_dim.
    """
    proj = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    return 2.0 * tokens * (proj + mlp) + 2.0 * tokens * tokens * heads * head_dim


def lm_flops(tokens_per_layer_per_sample: list[list[int]], text_config) -> float:
    """Total FLOPs over layers and samples; tokens_per_layer_per_sample[layer][sample]."""
    return sum(lm_flops_per_sample(tokens_per_layer_per_sample, text_config))


def lm_flops_per_sample(tokens_per_layer_per_sample: list[list[int]], text_config) -> list[float]:
    """FLOPs of each sample summed over layers; tokens_per_layer_per_sample[layer][sample]."""
    # Config attributes are read once: a transformers config's attribute access is slow.
    heads, hidden = text_config.num_attention_heads, text_config.hidden_size
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    intermediate = text_config.intermediate_size
    per_sample = [0.0] * (len(tokens_per_layer_per_sample[0]) if tokens_per_layer_per_sample else 0)
    for layer in tokens_per_layer_per_sample:
        for b, t in enumerate(layer):
            per_sample[b] += layer_flops(t, hidden, intermediate, heads, kv_heads, head_dim)
    return per_sample


def fill_report(report: Report, tokens: list[list[int]], visual: list[list[int]], unpruned: list[int], text_config) -> None:
    """Per-layer and per-sample statistics of a prefill.

    tokens[layer][sample] and visual[layer][sample]: what each layer processed;
    unpruned[sample]: the sample's tokens without pruning.
    """
    n_layers = len(tokens)
    report.visual_per_layer = [sum(v) / len(v) for v in visual]
    report.tokens_per_layer = [sum(t) / len(t) for t in tokens]
    report.flops_per_sample = lm_flops_per_sample(tokens, text_config)
    report.lm_flops = sum(report.flops_per_sample)
    report.lm_flops_unpruned = lm_flops([unpruned] * n_layers, text_config)
    report.visual_per_sample = [sum(col) / len(col) for col in zip(*visual, strict=True)]


def finish_report(
    report: Report, real: torch.Tensor | list[int] | None, slots: list[list[int]], visual: list[list[int]],
    level_of_layer: list[int], input_length: int, text_config, finite: list[torch.Tensor] = (),
) -> list[list[bool]]:
    """Complete a prefill's report in at most one host sync: the padding (when not known on the
    host) and the finite flags; nothing when neither is on the device.

    The kept indices are not read: they stay where the stages made them (the model's device), so
    a plan whose stages read no states ends its prefill without a host sync.
    real: [B] real (unpadded) tokens of each sample's L input tokens, a tensor (read here) or a list
    already on the host (None: no padding); slots, visual:
    [levels][B] each level's slots and visual tokens per sample, host-side (padding tokens are
    slots a stage never drops); level_of_layer: the level each decoder layer runs;
    input_length: L, the language model's input length before any stage; finite: [B] bool
    flags computed on the device, read in the same sync and returned (as lists of bools).
    """
    batch = len(slots[0])
    real_on_device = isinstance(real, torch.Tensor)
    parts = ([real] if real_on_device else []) + list(finite)  # 1-D integer (or bool) tensors, on one device
    values = torch.cat(parts).tolist() if parts else []
    n_real = batch if real_on_device else 0
    pads = [0] * batch if real is None else [input_length - n for n in (values[:batch] if real_on_device else real)]
    read = values[n_real:]
    flags = [[bool(v) for v in read[i * batch: (i + 1) * batch]] for i in range(len(finite))]
    tokens = [[n - p for n, p in zip(slots[i], pads, strict=True)] for i in level_of_layer]
    fill_report(report, tokens, [visual[i] for i in level_of_layer], [input_length - p for p in pads], text_config)
    return flags
