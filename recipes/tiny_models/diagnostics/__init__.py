"""One-off measurements behind the tiny models cards and benchmarks/RESULTS.md (``python -m recipes.tiny_models.diagnostics.<name>``)."""
