"""BrainDINO training library: data, self-supervised objectives, trainer, heads and evaluation.

Builds on the inference core (``BrainDINOLib``); never the other way round.
"""
