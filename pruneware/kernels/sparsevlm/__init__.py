"""SparseVLM's text raters and token recycling: ``text_raters`` and ``recycle``.

Three paths, one result:
  - ``triton.py``: each in one launch for the whole batch, for CUDA tensors;
  - ``cpu.py``: numpy, for CPU tensors (a torch call per small step costs more than the step);
  - ``reference.py``: the rule in plain torch, the truth the others are tested against.
``PRUNEWARE_KERNELS=reference`` forces the reference and ``=triton`` the kernels (see
:mod:`pruneware.kernels.dispatch`). The Triton module is imported only when used.
"""

from __future__ import annotations

import torch

from ..dispatch import choose_backend, forced_backend
from .reference import rated_count, recycled_count

__all__ = ["rated_count", "rater_scores", "recycle", "recycled_count", "text_raters"]


def _backend(*tensors: torch.Tensor) -> str:
    if choose_backend(*tensors) == "triton":
        return "triton"
    return "cpu" if tensors[0].device.type == "cpu" and forced_backend() != "reference" else "reference"


def text_raters(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the text slots that rate the visual tokens (SparseVLM's `t_token_idx`).

    Args:
        embeds: ``[B, L, D]`` float, the language model's input embeddings.
        visual: ``[B, L]`` bool, the visual slots.
        text: ``[B, L]`` bool, the candidate text slots.

    Returns:
        ``[B, L]`` bool: the candidates whose mean softmax relevance to the visual tokens is above
        the sample's mean (none for a sample without visual or candidate slots).

    Raises:
        ValueError: a shape or dtype that does not fit, naming the value.
    """
    backend = _backend(embeds, visual, text)
    if backend == "triton":
        from .triton import text_raters as impl
    elif backend == "cpu":
        from .cpu import text_raters as impl
    else:
        from .reference import text_raters as impl
    return impl(embeds, visual, text)


def recycle(
    hidden: torch.Tensor, scores: torch.Tensor, kept: list[torch.Tensor] | torch.Tensor, counts: list[int],
    merge: bool = True,
) -> tuple[list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | torch.Tensor]:
    """Each sample's kept tokens plus its recycled ones (SparseVLM's token recycling).

    Args:
        hidden: ``[B, N, D]`` float visual states; sample b's tokens are its first ``counts[b]`` rows.
        scores: ``[B, N]`` float rating of each token (the highest-rated pruned tokens are recycled).
        kept: the slots the top-k kept per sample: a list of ``[k_b]`` int64, or ``[B, k]``.
        counts: per sample, its visual tokens (known on the host: no sync).
        merge: False returns the kept tokens only.

    Returns:
        the sorted slots ``[k_b + c_b]`` int64 per sample and their states ``[k_b + c_b, D]``
        (c_b = ``recycled_count(counts[b] - k_b)`` merged tokens in the last pruned slots), as
        lists, or as ``[B, k]`` and ``[B, k, D]`` tensors.

    Raises:
        ValueError: a shape or count that does not fit, naming the value.
    """
    backend = _backend(hidden, scores)
    if backend == "triton":
        from .triton import recycle as impl
    elif backend == "cpu":
        from .cpu import recycle as impl
    else:
        from .reference import recycle as impl
    return impl(hidden, scores, kept, counts, merge)


def rater_scores(
    q: torch.Tensor, k: torch.Tensor, raters: torch.Tensor, run: slice, key_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``[B, L]`` float32: the softmax attention SparseVLM's rater rows pay each key, summed over
    heads and raters (see ``reference.rater_scores``).

    Args:
        q: ``[B, H, T, d]`` the query rows, at slots ``run.start .. L-1`` (a run every sample shares).
        k: ``[B, Hkv, L, d]`` the keys (not repeated for GQA).
        raters: ``[B, T]`` bool, the rows that count (real tokens, which see themselves).
        run: the rows' slots. key_mask: ``[B, L]`` bool real keys, or None. scale: the logit scale.

    On CUDA the shared score kernel (``kernels.scores``, one Triton launch) computes it; on the CPU
    ``cpu.py``, the same numbers in fewer ops. Raises ValueError for inputs that do not fit.
    """
    if _backend(q, k) == "cpu":
        from .cpu import rater_scores as impl

        return impl(q, k, raters, run, key_mask, scale)
    if _backend(q, k) == "reference":
        from .reference import rater_scores as impl

        return impl(q, k, raters, run, key_mask, scale)
    from ..scores import attention_scores

    slots = torch.arange(run.start, k.shape[2], device=q.device).expand(q.shape[0], -1)
    return attention_scores(q, k, raters.float(), query_positions=slots, key_mask=key_mask, scale=scale,
                            check_positions=False, live_rows=True)[0]
