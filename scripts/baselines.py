"""The ways other tools train a neuron subnetwork, as the benchmarks compare them with neuronreg's
row-sparse deltas (`bench_finetune.py` on CPU, `bench_gpu.py` on a GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedSplice(nn.Module):
    """The seed paper's way: the selected slices are Parameters, spliced into a clone of the full matrix
    on every forward."""

    def __init__(self, base: nn.Linear, index: torch.Tensor, dim: int):
        super().__init__()
        self.base, self.dim = base, dim
        self.register_buffer("index", index.to(base.weight.device))
        self.trainable = nn.Parameter(base.weight.detach().index_select(dim, self.index).clone())

    def forward(self, x):
        weight = self.base.weight.clone()
        if self.dim == 0:
            weight[self.index] = self.trainable
        else:
            weight[:, self.index] = self.trainable
        return F.linear(x, weight)
