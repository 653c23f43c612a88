"""Measuring models: next-token loss on held-out text (``heldout``, the one measurement that every
command uses) and ablation of language masks (``ablation``)."""
