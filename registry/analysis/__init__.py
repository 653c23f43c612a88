"""What fine-tuning did to a model, beyond its scores: pure functions over models, tensors and plain
records (never run folders; the command line adapts runs to them).

* :mod:`.representations`: sentence representations per layer (mean residual stream after a layer);
* :mod:`.alignment`: cross-lingual alignment on line-aligned parallel text (cosines, retrieval);
* :mod:`.updates`: weight updates per layer and projection (row-sparse, low-rank, dense), their
  spread over neurons, and the share on a mask against random neurons;
* :mod:`.dynamics`: per-step training logs as series and summaries;
* :mod:`.stats`: summaries, Welch's t-test and the exact permutation test (``math`` only);
* :mod:`.seeds`: runs that differ only in their seed, grouped and compared.

This package sits above ``evaluation`` and ``finetune`` and imports neither's run-folder code.
"""
