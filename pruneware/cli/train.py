"""`pruneware train-adapter`: the training entry point.

It forwards its options to the module entry point (`python -m pruneware.tuning.crosslmm`);
`--help` after the command shows them. The embedded tiny models are trained by the staged
recipe in the repository, not in the package: `python -m recipes.tiny_models.<stage>` from a
clone (`recipes/tiny_models/README.md`).
"""

from __future__ import annotations

import typer

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def train_adapter(ctx: typer.Context) -> None:
    """Train a CrossLMM V2V compressor by distillation (options: --help)."""
    from pruneware.tuning.crosslmm import main

    main(list(ctx.args))
