"""Stage 2 for tiny-qwen2.5-vl: the pieces that differ from tiny-llava's (``language.py`` runs it
with ``--arch qwen2.5-vl``).

* **Layout.** ``<|im_start|> user <|vision_start|> <image> x 576 <|vision_end|> question
  <|im_end|> <|im_start|> assistant answer <|im_end|>``, with Qwen2.5-VL's M-RoPE positions:
  text tokens share one position on all three axes; image cell (r, c) sits at (3, 3 + r,
  3 + c); the text after the image resumes at 3 + 24 (``get_rope_index`` of transformers).
* **Cells without position.** Qwen2.5-VL's vision tower has no absolute position embedding, so
  a cell token is the sum of its label embeddings only; where a cell is comes from M-RoPE. A
  linear probe on every cell's row at layer 1 (``cellpos``, dropped after training) regresses
  the cell's row and column, so the model builds absolute position early, as tiny-llava's
  row/column embeddings gave it at the input.
* **Transfer.** ``--transfer`` starts from tiny-llava's stage-2 checkpoint: the layers, norms
  and label embeddings carry over (q/k/v biases start at zero), word embeddings and output rows
  are mapped word by word, and the prompt's own tokens take the rows of their LLaVA
  counterparts (``assistant`` answers where LLaVA's ``:`` did).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pruneware.evals.synthetic.scene import Scene
from pruneware.models.grounding import HEADS

from .packing import GRID, N_CELLS, Packed, aux_targets, cell_targets, pointing, word_links

PREFIX = ["<|im_start|>", "user", "<|vision_start|>"]
IMAGE_AT = len(PREFIX)
TAIL = ["<|im_end|>", "<|im_start|>", "assistant"]  # the answer follows ``assistant``
# Qwen token <- tiny-llava token whose trained rows it starts from (benchmark words map to themselves).
FROM_LLAVA = {
    "<|endoftext|>": "<pad>", "<unk>": "<unk>", "<|im_end|>": "</s>", "<|image_pad|>": "<image>",
    "user": "USER", "<|im_start|>": "ASSISTANT", "assistant": ":", "<|vision_start|>": "<s>",
}  # fmt: skip
CELLPOS_LAYER = 1


def pack_qwen(scene: Scene, qas: list[tuple[str, str, str]], vocab: dict[str, int]) -> Packed:
    """:func:`packing.pack` in the Qwen2.5-VL prompt layout, with M-RoPE positions [L, 3]."""
    ids = [vocab[w] for w in PREFIX] + [vocab["<|image_pad|>"]] * N_CELLS + [vocab["<|vision_end|>"]]
    rows, cols = torch.arange(N_CELLS) // GRID, torch.arange(N_CELLS) % GRID
    image = torch.stack([torch.full((N_CELLS,), IMAGE_AT), IMAGE_AT + rows, IMAGE_AT + cols], 1)
    text_at = IMAGE_AT + GRID  # where text resumes after the image (``<|vision_end|>``)
    positions = [torch.arange(IMAGE_AT)[:, None].expand(-1, 3), image, torch.full((1, 3), text_at)]
    segment, answer_at, point, aux = [-2] * len(ids), [], [], []
    cells = cell_targets(scene, GRID)
    for k, (q, a, task) in enumerate(qas):
        words = q.replace("?", " ?").split() + TAIL + [a, "<|im_end|>"]
        answer_at.append(len(ids) + len(words) - 2)
        point.append(pointing(scene, cells, q, task))
        aux.append(aux_targets(scene, q, task))
        point[-1].update(word_links(q, task, len(ids) - IMAGE_AT))
        ids += [vocab[w] for w in words]
        positions.append(torch.arange(text_at + 1, text_at + 1 + len(words))[:, None].expand(-1, 3))
        segment += [k] * len(words)
    return Packed(
        torch.tensor(ids), torch.cat(positions), torch.tensor(segment), torch.tensor(answer_at),
        cells, point, [t for _, _, t in qas], aux, image_at=IMAGE_AT,
    )  # fmt: skip


class CellLabels(torch.nn.Module):
    """Visual tokens [..., D] from cell labels [..., 5]: a sum of learned label embeddings
    (no row or column term; ``index`` is accepted for the same call as ``CellEmbedding``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.labels = torch.nn.ModuleList(torch.nn.Embedding(n, dim) for n in HEADS.values())

    def forward(self, cells: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return sum(e(cells[..., k]) for k, e in enumerate(self.labels))


class Stage2Qwen(torch.nn.Module):
    """The LLM of a tiny Qwen2.5-VL fed by :class:`CellLabels` instead of a vision tower."""

    def __init__(self, model):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.cell = CellLabels(model.config.text_config.hidden_size)

    def forward(self, ids, cells, index, is_cell, pos, mask) -> torch.Tensor:
        """Final hidden states [B, L, D]; ``pos`` [B, L, 3] M-RoPE positions."""
        x = torch.where(is_cell[..., None], self.cell(cells), self.lm.embed_tokens(ids))
        return self.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos.permute(2, 0, 1)).last_hidden_state


def cellpos_loss(hidden: torch.Tensor, index: torch.Tensor, is_cell: torch.Tensor, probe: torch.nn.Module) -> torch.Tensor:
    """MSE of ``probe`` (D -> 2) reading each cell's (row, col) / 23 from layer ``CELLPOS_LAYER``'s
    output ``hidden`` [B, L, D] at the cell rows (``is_cell`` [B, L], ``index`` [B, L])."""
    rows = hidden[is_cell]  # [N, D]
    idx = index[is_cell]
    want = torch.stack([idx // GRID, idx % GRID], -1).float() / (GRID - 1)
    return ((probe(rows) - want) ** 2).mean()


def transfer_from_llava(net: Stage2Qwen, probes: torch.nn.Module, folder: Path, qwen_vocab: dict, llava_vocab: dict) -> None:
    """Load tiny-llava's stage-2 checkpoint ``folder`` into ``net`` and ``probes`` (see module doc)."""
    from safetensors.torch import load_file

    t = load_file(str(folder / "state.safetensors"))
    lm = {k[len("net.lm."):]: v for k, v in t.items() if k.startswith("net.lm.") and "embed_tokens" not in k}
    missing, unexpected = net.lm.load_state_dict(lm, strict=False)
    assert not unexpected and all(k.endswith("bias") or "embed_tokens" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k in missing:
            if k.endswith("bias"):
                net.lm.get_parameter(k).zero_()
        src_embed, src_head = t["net.lm.embed_tokens.weight"], t["net.head.weight"]
        for word, i in qwen_vocab.items():
            j = llava_vocab.get(FROM_LLAVA.get(word, word))
            if j is not None:
                net.lm.embed_tokens.weight[i] = src_embed[j]
                net.head.weight[i] = src_head[j]
        for k, e in enumerate(net.cell.labels):
            e.weight.copy_(t[f"net.cell.labels.{k}.weight"])
        for name, p in probes.named_parameters():
            if f"probes.{name}" in t:
                p.copy_(t[f"probes.{name}"])
