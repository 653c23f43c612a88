"""Measuring models: next-token loss on held-out text (``heldout``, the one measurement that every
command uses), ablation of language masks (``ablation``), benchmarks through lm-evaluation-harness
(``benchmarks``, with neuronreg's task configs in ``tasks/``) and the report across runs (``report``)."""
