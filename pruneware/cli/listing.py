"""`pruneware plans` and `pruneware models`: what exists."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pruneware.cli.common import emit_json, user_errors


@user_errors
def plans(json_out: bool = typer.Option(False, "--json")) -> None:
    """List policies, presets and supported model families."""
    from pruneware.adapters import supported_model_types
    from pruneware.policies import available
    from pruneware.plans.presets import available_presets

    policies = [
        {"name": n, "description": c.description, "pre": c.needs.pre, "in_llm": c.needs.llm, "vit": c.needs.vit,
         "needs_attention": c.needs.attention is not None} for n, c in sorted(available().items())
    ]
    presets = [
        {"name": n, "description": p.description, "plan_32_layers": str(p.build(32))}
        for n, p in sorted(available_presets().items())
    ]
    if json_out:
        emit_json({"policies": policies, "presets": presets, "model_types": supported_model_types()})
        return
    console = Console()
    table = Table(title="policies")
    for column in ("name", "where", "description"):
        table.add_column(column)
    for p in policies:
        places = [name for name, ok in (("pre-vit, vitK", p["vit"]), ("pre", p["pre"]), ("K", p["in_llm"])) if ok]
        where = " or ".join(places) if places != ["K"] else "K >= 1"
        table.add_row(p["name"], where, p["description"])
    console.print(table)
    table = Table(title="presets (layers scale with depth; shown for 32 layers)")
    for column in ("name", "plan", "description"):
        table.add_column(column)
    for p in presets:
        table.add_row(p["name"], p["plan_32_layers"], p["description"])
    console.print(table)
    console.print("model types: " + ", ".join(supported_model_types()))


@user_errors
def models(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the embedded tiny models."""
    from pruneware import models as embedded

    rows = [{"name": n, "architecture": arch, "installed": n in embedded.available()} for n, arch in embedded.MODELS.items()]
    if json_out:
        emit_json({"models": rows})
        return
    table = Table(title="embedded models (offline; the default of every command)")
    for column in ("name", "architecture", "installed"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], r["architecture"], "yes" if r["installed"] else "no")
    Console().print(table)
