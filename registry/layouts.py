"""The MLP layouts neuronreg knows, as plain data (no torch: the manifest and summaries use it too).

Each layout names the attributes an MLP module holds: the projection that makes the intermediate
activations, the activation module whose OUTPUT is counted, how many rows of that projection belong
to one neuron (the fused ``gate_up_proj`` holds gate then up), the second projection, and how many
weights one neuron owns (what sparse fine-tuning trains: a gate row, an up row and a down column for
gated MLPs; a first-projection row and a second-projection column for plain ones).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    first: str  # the projection whose output the activation reads
    activation: str  # the module whose output is counted
    rows_per_neuron: int
    second: str  # the projection back to the hidden size
    weights_per_neuron: int  # times the hidden size
    families: str


LAYOUTS = (
    Layout("gated", "gate_proj", "act_fn", 1, "down_proj", 3, "Llama, Mistral, Qwen2/3, Gemma 2/3, Cohere/Aya"),
    Layout("fused-gated", "gate_up_proj", "activation_fn", 2, "down_proj", 3, "Phi-3"),
    Layout("gpt2", "c_fc", "act", 1, "c_proj", 2, "GPT-2"),
    Layout("fc", "fc1", "activation_fn", 1, "fc2", 2, "OPT (on the decoder layer), Phi-1/2"),
    Layout("bloom", "dense_h_to_4h", "gelu_impl", 1, "dense_4h_to_h", 2, "BLOOM"),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}
GATED = ("gated", "fused-gated")
SUPPORTED = (
    "gated MLPs with gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2/3, Gemma 2/3, Cohere/Aya), "
    "Phi-3's fused gate_up_proj, GPT-2 (c_fc), OPT and Phi-2 (fc1), BLOOM (dense_h_to_4h)"
)


def weights_per_neuron(layout: str | None, hidden_size: int | None) -> int | None:
    """Weights one neuron owns, or None when the hidden size is unknown."""
    if not hidden_size:
        return None
    return BY_NAME.get(layout or "gated", LAYOUTS[0]).weights_per_neuron * int(hidden_size)
