"""The `pruneware` command: run, eval, tune, bench, viz, plans, models."""

from __future__ import annotations

import typer

from pruneware.cli.bench import bench
from pruneware.cli.evaluate import evaluate
from pruneware.cli.export_bench import export_bench
from pruneware.cli.listing import models, plans
from pruneware.cli.run import run
from pruneware.cli.train import PASS_THROUGH, train_adapter
from pruneware.cli.tune import tune
from pruneware.cli.viz import viz

app = typer.Typer(
    help="Visual-token pruning for vision-language models. With no --model, every command uses "
    "the embedded tiny model: nothing is downloaded.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
app.command("run")(run)
app.command("eval")(evaluate)
app.command("tune")(tune)
app.command("bench")(bench)
app.command("viz")(viz)
app.command("export-bench")(export_bench)
app.command("plans")(plans)
app.command("models")(models)
app.command("train-adapter", context_settings=PASS_THROUGH)(train_adapter)


def main() -> None:
    app()
