"""`pruneware train-tiny` and `pruneware train-adapter`: the training entry points.

Both forward their options to the module entry points (`python -m pruneware.models.train`,
`python -m pruneware.crosslmm.train`); `--help` after the command shows them.
"""

from __future__ import annotations

import typer

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def train_tiny(ctx: typer.Context) -> None:
    """Train an embedded tiny model on the synthetic benchmark (options: --help)."""
    from pruneware.models.train import main

    main(list(ctx.args))


def train_adapter(ctx: typer.Context) -> None:
    """Train a CrossLMM V2V adapter by distillation (options: --help)."""
    from pruneware.crosslmm.train import main

    main(list(ctx.args))
