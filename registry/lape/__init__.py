"""LAPE itself: counting activations (``counting``, ``distributed``), selecting neurons (``selection``)
and the job that does both over a registry (``compute``)."""
