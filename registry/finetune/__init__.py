"""Sparse fine-tuning: settings and the run config (``config``), row-sparse deltas (``deltas``),
training (``training``), loading runs (``loading``), evaluating them (``evaluate``) and releasing
them on the Hub (``release``)."""
