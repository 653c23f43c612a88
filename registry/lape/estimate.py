"""How long counting takes, before it starts: from a measured rate, scaled by the model's size.

Measured on one H100 80 GB (``scripts/bench_gpu.py``, 2026-11-27, bf16, rows of 4096 tokens, one
process): ``count_activations`` on a Llama-3.1-8B-shaped model, with the activation statistics (the
default), counts 29,522 tokens/s. Counting is the
transformer body's forward pass, whose cost grows with the parameters (2 FLOP per weight per
token, the LM head skipped), so another model's rate is that rate times 8.03B / its parameters.
That is an estimate: attention's share grows with the sequence and shrinks with the width, and
small models do not fill a GPU (their rate is capped here at ten times the measured one).
"""

from __future__ import annotations

from dataclasses import dataclass

MEASURED = {"model": "Llama-3.1-8B", "parameters": 8_030_261_248, "tokens_per_s": 29_522.0,
            "gpu": "H100 80GB", "dtype": "bfloat16", "seq_len": 4096}


@dataclass(frozen=True)
class Estimate:
    model: str
    parameters: int | None
    languages: int
    tokens: int  # per language
    tokens_per_s: float | None  # per GPU

    @property
    def gpu_hours(self) -> float | None:
        if not self.tokens_per_s:
            return None
        return self.languages * self.tokens / self.tokens_per_s / 3600


def estimate(model: str, parameters: int | None, languages: int, tokens: int) -> Estimate:
    if not parameters:
        return Estimate(model, None, languages, tokens, None)
    rate = MEASURED["tokens_per_s"] * min(MEASURED["parameters"] / parameters, 10.0)
    return Estimate(model, parameters, languages, tokens, rate)
