"""Fine-tuning: the methods, each an object registered by name (``method``: the base class and the
registry; ``deltas``: lape and random, row-sparse deltas on neurons; ``adapters``: lora and ia3 through
PEFT; ``dense``: ffn and full), the shared settings (``config``), training (``training``), what merging
into a lower precision loses (``merging``), checks of run files (``validate``), loading runs
(``loading``), evaluating them (``evaluate``) and releasing them on the Hub (``release``). A run
folder's files and config are described in :mod:`neuronreg.runs`."""
