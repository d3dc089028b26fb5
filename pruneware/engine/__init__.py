"""The run-time engine: a `Session` installs hooks on a model for its lifetime, resolves the
plan for each input, runs the stages and remaps the decode steps (see `session.py`)."""
