"""Sparse fine-tuning: settings and the run config (``config``), row-sparse deltas (``deltas``), the
PEFT baselines LoRA and IA3 (``adapters``), what merging into a lower precision loses (``merging``),
training (``training``), loading runs (``loading``), evaluating them (``evaluate``) and releasing
them on the Hub (``release``)."""
