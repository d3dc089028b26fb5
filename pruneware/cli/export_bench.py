"""`pruneware export-bench`: the synthetic benchmark as a local dataset and an lmms-eval task."""

from __future__ import annotations

import typer

from pruneware.cli.common import UserError, check_minimum, check_out_folder, emit_json, user_errors


@user_errors
def export_bench(
    out: str = typer.Option(..., help="Folder for data/ (a datasets save_to_disk folder) and <name>.yaml."),
    n: int = typer.Option(500, help="Questions (the first N are `pruneware eval --limit N`'s)."),
    seed: int = typer.Option(0, help="Seed of the synthetic split, as `pruneware eval --seed`."),
    name: str = typer.Option("pruneware_synthetic", help="lmms-eval task name (and YAML file name)."),
    json_out: bool = typer.Option(False, "--json", help="stdout is one JSON object with the paths."),
) -> None:
    """Write the synthetic benchmark for lmms-eval: load it with --include_path OUT --tasks NAME."""
    from pruneware.integrations.lmms_eval.task import export_bench as export

    check_minimum("--n", [n], 1)
    check_out_folder(out)

    try:
        paths = export(out, n=n, seed=seed, task=name)
    except (ValueError, ImportError) as err:
        raise UserError(str(err)) from None
    if json_out:
        emit_json({"task": name, "n": n, "seed": seed, **{k: str(v) for k, v in paths.items()}})
        return
    typer.echo(f"wrote {paths['data']} and {paths['yaml']}; run: python -m lmms_eval --model pruneware "
               f"--tasks {name} --include_path {paths['yaml'].parent}")
