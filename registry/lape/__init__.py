"""LAPE itself: counting activations (``counting``, with the CUDA kernel in ``kernels``), selecting
neurons (``selection``), the time estimate (``estimate``) and the job that does both over a registry
(``compute``)."""
