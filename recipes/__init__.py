"""Training recipes kept beside pruneware, not shipped in its wheel (run them from a clone)."""
