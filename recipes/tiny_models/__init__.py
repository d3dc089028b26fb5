"""The staged training recipe of pruneware's embedded tiny models (see ``pruneware/models/cards``).

Run from the root of a clone: ``python -m recipes.tiny_models.<stage>`` (``README.md`` here).

1. ``vision``: the vision tower alone, on dense per-cell labels (colour, shape, glyph, centre).
2. ``language``: the language model alone, on question answering over ground-truth visual
   tokens (a learned embedding of each cell's labels and grid position), with background
   dropping early, a ramp back to every cell, and task-specific pointing targets.
3. ``assemble``: the projector learns to map stage 1's features to stage 2's visual tokens,
   then the whole model is fine-tuned end to end on rendered images.

Every stage is resumable (``--resume``) from safetensors checkpoints written every few minutes.
"""
