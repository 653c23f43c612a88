"""Summaries of stored neurons: per layer, totals and the share of parameters they train."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Weights one neuron owns: gated MLPs have a gate row, an up row and a down column; plain MLPs a
# first-projection row and a second-projection column.
WEIGHTS_PER_NEURON = {"gated": 3, "fused-gated": 3, "gpt2": 2, "fc": 2, "bloom": 2}


@dataclass
class NeuronSummary:
    model: str
    language: str
    num_neurons: int
    per_layer: list[int]
    trainable_weights: int | None  # None when the hidden size is unknown
    num_parameters: int | None

    @property
    def share(self) -> float | None:
        if not (self.num_parameters and self.trainable_weights is not None):
            return None
        return self.trainable_weights / self.num_parameters


def summarize(model: str, language: str, table: pa.Table, provenance: dict) -> NeuronSummary:
    layers = int(provenance["num_layers"])
    per_layer = [0] * layers
    for layer in table.column("layer").to_pylist():
        per_layer[layer] += 1
    info = provenance.get("model") or {}
    hidden = provenance.get("hidden_size")
    per_neuron = WEIGHTS_PER_NEURON.get(info.get("mlp_layout", "gated"), 3) * int(hidden) if hidden else None
    return NeuronSummary(model, language, table.num_rows, per_layer,
                         table.num_rows * per_neuron if per_neuron else None, info.get("num_parameters"))


def format_share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.3f}%"
