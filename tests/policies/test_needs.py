"""The `Needs` declaration: what it derives, what it refuses, and that the engine reads only it."""

from __future__ import annotations

import pathlib

import pytest

import pruneware
from pruneware.policies import Needs, available, policy_names


def test_where_is_derived_from_what_the_policy_reads():
    assert Needs().where == ("pre", "llm", "vit")
    assert Needs(attention="previous").where == ("llm",)
    assert Needs(output="merge").where == ("pre",)
    assert Needs(vision=("attention",)).where == ("pre", "vit")
    assert Needs(vision=("resize",)).where == ("pre",)
    assert Needs(where=("llm",)).where == ("llm",)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"attention": "own", "where": ("pre",)}, "can run only at"),
    ({"attention": "previous", "output": "merge"}, "can neither merge"),
    ({"query": "post-image"}, "need attention="),
    ({"final_norm": True}, "need attention="),
    ({"captures": "key-norm", "text": True}, "need attention="),
])
def test_inconsistent_declarations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Needs(**kwargs)


def test_text_rows_without_attention_run_anywhere():
    """CDPruner reads the instruction's states, no attention: pre and in the LLM."""
    assert Needs(text=True, query="post-image").where == ("pre", "llm")


def test_every_registered_policy_declares_needs():
    for cls in available().values():
        assert isinstance(cls.needs, Needs)


def test_policy_lists_come_from_the_registry():
    assert policy_names(lambda n: bool(n.vision)) == "fastervlm, resize, visionzip"
    with pytest.raises(pruneware.PlanError, match="valid policies: " + policy_names()):
        pruneware.policies.get_policy("nosuch")


def test_the_engine_never_asks_which_class_a_policy_is():
    engine = pathlib.Path(pruneware.__file__).parent / "engine"
    for path in engine.glob("*.py"):
        assert "AttentionPolicy" not in path.read_text(), path.name
