"""The `--model_args` of `--model pruneware`, checked, and the model they load.

    pretrained=<embedded name | local folder | hub id>   default tiny-llava
    plan=<plan or preset>       default none (no pruning); stages joined by '+' or a quoted ','
    avg_tokens=<N>              solve the plan's budgets to N visual tokens per decoder layer
                                (a scaled preset, or a plan without written budgets)
    seed=<S>                    seeds random policies (default 0)
    attn_implementation=sdpa|eager|flash_attention_2   default: the checkpoint's
    dtype=auto|float32|bfloat16|float16                default: transformers' default
    device=cpu|cuda|cuda:N      default: cuda when available (also lmms-eval's --device)
    batch_size=<N>              lmms-eval's --batch_size (requests per generate call)
    cost_file=<path>            where to write the per-request cost (see `cost.py`)

lmms-eval splits `--model_args` on commas, so a multi-stage plan is written with '+' between
stages (`plan=divprune@pre:0.5+random@20:0.2`) or quoted (`plan="divprune@pre:0.5,random@20:0.2"`).
Any other argument is refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

NO_PLAN = "none"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


class ModelArgsError(ValueError):
    """A `--model_args` entry is unknown or out of range: names it and the valid choices."""


@dataclass(frozen=True)
class ModelArgs:
    """Checked model arguments (see the module docstring)."""

    pretrained: str = "tiny-llava"
    plan: str = NO_PLAN
    avg_tokens: float | None = None
    seed: int = 0
    attn_implementation: str | None = None
    dtype: str | None = None
    device: str | None = None
    batch_size: int = 1
    cost_file: str | None = None

    @classmethod
    def parse(cls, **kwargs: object) -> ModelArgs:
        """From lmms-eval's keyword arguments (values already typed by lmms-eval's parser)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs.pop("max_batch_size", None)  # lmms-eval always passes it; batches are batch_size
        unknown = sorted(k for k in kwargs if k not in valid)
        if unknown:
            raise ModelArgsError(f"unknown model_args {', '.join(unknown)} for --model pruneware; valid: {', '.join(valid)}")
        values = {k: v for k, v in kwargs.items() if v is not None}
        if "plan" in values:
            values["plan"] = str(values["plan"]).strip("'\"").replace("+", ",")
        if "pretrained" in values:
            values["pretrained"] = str(values["pretrained"])
        if "avg_tokens" in values:
            values["avg_tokens"] = _number("avg_tokens", values["avg_tokens"], float)
        if "seed" in values:
            values["seed"] = _number("seed", values["seed"], int)
        if "batch_size" in values:
            values["batch_size"] = _number("batch_size", values["batch_size"], int)
            if values["batch_size"] < 1:
                raise ModelArgsError(f"batch_size must be an integer >= 1, got {kwargs['batch_size']!r}")
        if "avg_tokens" in values and values.get("plan", NO_PLAN) != NO_PLAN:
            from pruneware.plans import accepts_avg_tokens

            if not accepts_avg_tokens(values["plan"]):
                raise ModelArgsError(
                    f"plan {values['plan']!r} writes its own budgets, which conflict with avg_tokens: drop "
                    "avg_tokens, or give a scaled preset (`pruneware plans`) or a plan without budgets "
                    "(divprune@pre+random@20)"
                )
        if values.get("dtype") not in (None, *DTYPES):
            raise ModelArgsError(f"dtype {values['dtype']!r} is not one of {', '.join(DTYPES)}")
        if values.get("attn_implementation") not in (None, *ATTENTION):
            raise ModelArgsError(f"attn_implementation {values['attn_implementation']!r} is not one of {', '.join(ATTENTION)}")
        return cls(**values)

    @property
    def pruned(self) -> bool:
        return self.plan != NO_PLAN


def _number(name: str, value: object, cast: type) -> float | int:
    try:
        number = cast(value)
        if cast is int and float(value) != number:  # 2.5 is not a batch size
            raise ValueError
    except (TypeError, ValueError):
        raise ModelArgsError(f"{name} must be {'an integer' if cast is int else 'a number'}, got {value!r}") from None
    return number


def load_model(args: ModelArgs):
    """`(model, processor)` in eval mode: an embedded name, a local folder or a hub id.

    Embedded models load from package data; a hub id goes through `from_pretrained`, which
    honours `HF_HUB_OFFLINE=1`. The family is picked from the config (see `pruneware.adapters`),
    and a model pruneware has no adapter for is refused before any request runs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from pruneware import models
    from pruneware.adapters.registry import adapter_for, unsupported_config

    if args.pretrained in models.MODELS:
        source, local = str(models.path(args.pretrained)), True
    else:
        local = Path(args.pretrained).expanduser().is_dir()
        source = str(Path(args.pretrained).expanduser()) if local else args.pretrained
    kwargs: dict[str, object] = {"local_files_only": True} if local else {}
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.attn_implementation is not None:
        kwargs["attn_implementation"] = args.attn_implementation
    problem = unsupported_config(AutoConfig.from_pretrained(source, **({"local_files_only": True} if local else {})))
    if problem is not None:
        raise ModelArgsError(f"pretrained={args.pretrained} {problem}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(source, **({"local_files_only": True} if local else {}))
    adapter_for(model)  # a supported family whose class lacks the expected layout: TypeError
    return model, processor
