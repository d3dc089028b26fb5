"""lmms-eval plugin: `--model pruneware` evaluates a pruned LLaVA or Qwen-VL on lmms-eval's tasks.

    pip install "pruneware[lmms]"
    python -m lmms_eval --model pruneware \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plan=divprune@pre:64 \
        --tasks pope --batch_size 8 --output_path runs/lmms

lmms-eval (0.7+) finds third-party models through the entry-point group `lmms_eval.models`;
pruneware's entry point is `manifest` below, which returns a `ModelManifest` with model id
`pruneware`: the chat class (`is_simple=False`, preferred by lmms-eval) and the simple class
(`--force_simple`). Both live in `pruneware.integrations.lmms_eval.model` and are imported only
when lmms-eval resolves the name, so listing models never loads torch models. The plugin adds
a name; it patches and shadows none of lmms-eval's built-in models.

Model arguments are documented in `pruneware.integrations.lmms_eval.args`; the pruning cost of
every request is recorded by `pruneware.integrations.lmms_eval.cost`.
"""

from __future__ import annotations

MODEL_ID = "pruneware"
CHAT_CLASS = "pruneware.integrations.lmms_eval.model.PrunewareChat"
SIMPLE_CLASS = "pruneware.integrations.lmms_eval.model.PrunewareSimple"


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval's `ModelManifest` for `--model pruneware`.

    It must never raise: lmms-eval loads every plugin in one try block, so one failing entry
    point hides the plugins after it. Importing `registry_v2` is cheap (standard library only).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS, chat_class_path=CHAT_CLASS)


__all__ = ["CHAT_CLASS", "MODEL_ID", "SIMPLE_CLASS", "manifest"]
