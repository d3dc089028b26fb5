"""Errors shared by the plan grammar and the registries (a module of its own, so that plans/plan.py
can use the policy registry and the registry can raise PlanError without an import cycle)."""

from __future__ import annotations


class PlanError(ValueError):
    """A plan that cannot run: bad syntax, unknown policy, or out-of-range values."""


class ArgumentError(TypeError, ValueError):
    """An argument of `prune` / `attach` of the wrong type or out of range, raised when the
    session is created (a TypeError and a ValueError, so either `except` catches it)."""


class NonFiniteError(ValueError):
    """A stage's policy read NaN or infinite values (e.g. from NaN pixel values): its choice
    would be arbitrary, so the call fails, naming the stage and its policy."""
