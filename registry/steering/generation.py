"""Generating with and without steering, side by side (``neuronreg generate``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import SettingsError
from ..manifest import Manifest
from ..models import load_model
from ..options import LoadOptions
from ..progress import progress
from ..resolve import resolve_model
from ..store.local import LocalRegistry
from .plan import SteeringPlan, SteeringSettings, log, plan_steering, steered

# Short, neutral English openings: nothing in them asks for a language, a place or a culture.
DEFAULT_PROMPTS = (
    "The weather today is",
    "My favourite food is",
    "Yesterday I went to the",
    "The most important thing in life is",
    "Every morning, I like to",
    "The best way to learn something new is",
    "When I was a child,",
    "The city at night is",
    "A good friend is someone who",
    "The book I am reading is about",
    "In the garden, there are",
    "Music makes people",
    "The train was late because",
    "On weekends, my family",
    "The old house on the hill",
    "Water is important because",
    "The teacher told the students",
    "After dinner, we usually",
    "The small dog ran",
    "Tomorrow I will",
)



# -- generation -----------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    """How outputs are generated: greedy by default; ``sample`` draws with ``temperature`` from ``seed``.

    Only these settings count (the model's own generation config, e.g. an instruct model's sampling
    defaults, is not used), so base and steered outputs differ by the steering alone.
    """

    max_new_tokens: int = 40
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SettingsError(f"{key} must be a positive integer, got {value!r}.")
        for key in ("temperature", "repetition_penalty"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                     and value > 0):
                raise SettingsError(f"{key} must be a positive number, got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"Cannot read the prompts file {path} ({getattr(exc, 'strerror', None) or exc}).",
                            fix="prompts") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SettingsError(f"The prompts file {path} holds no prompt.", fix="prompts")
    return prompts


def check_prompts(prompts: Iterable[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise SettingsError("No prompt was given.", fix="prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError(f"Prompt {i + 1} is empty.", fix="prompts")
    return prompts


def generate_texts(model: torch.nn.Module, tokenizer, prompts: list[str], settings: GenerationSettings, *,
                   bar=None) -> list[str]:
    """The continuation of every prompt (new tokens only, special tokens dropped), in batches padded on
    the left. Sampling draws from its own seeded stream; the global random state is left as it was."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    pad = 0 if pad is None else pad
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
                              temperature=settings.temperature if settings.sample else None,
                              top_p=None, top_k=None if not settings.sample else 50,
                              repetition_penalty=settings.repetition_penalty, pad_token_id=pad, eos_token_id=eos,
                              bos_token_id=own.bos_token_id)
    texts: list[str] = []
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.inference_mode():
        torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            ids = [tokenizer(prompt)["input_ids"] or [pad] for prompt in batch]
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
            if bar is not None:
                bar.update(len(batch))
    return texts


@dataclass
class GenerationReport:
    """Base and steered continuations of the same prompts."""

    plan: SteeringPlan
    prompts: list[str]
    base: list[str]
    steered: list[str]
    settings: GenerationSettings

    def to_json(self) -> dict:
        return {"tool": "neuronreg", "version": __version__, "steering": self.plan.to_dict(),
                "generation": self.settings.to_dict(),
                "outputs": [{"prompt": p, "base": b, "steered": s}
                            for p, b, s in zip(self.prompts, self.base, self.steered)]}


def steered_generation(model_spec: str, prompts: list[str], steering: SteeringSettings, *, manifest: Manifest,
                       registry: LocalRegistry, settings: GenerationSettings | None = None, name: str | None = None,
                       load: LoadOptions | None = None) -> GenerationReport:
    """Generate from every prompt without and with steering (the registry is read before the model loads)."""
    settings = settings or GenerationSettings()
    prompts = check_prompts(prompts)
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    plan = plan_steering(ref.name, steering, registry=registry, manifest=manifest)
    log.info("Steering %s (%s): %s", plan.model, plan.selection, plan.describe())
    loaded = load_model(ref, load)
    plan.check(loaded.sites)
    bar = progress(2 * len(prompts), f"{ref.name} generate", unit="prompt")
    try:
        base = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, bar=bar)
        with steered(loaded.sites, plan):
            steered_texts = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, bar=bar)
    finally:
        bar.close()
    return GenerationReport(plan, prompts, base, steered_texts, settings)

