"""Evaluating a finished run: perplexity and bits per character per language, before and after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..corpus import resolve_corpus
from ..evaluation.heldout import Score, heldout_text, score
from ..manifest import Manifest
from ..resolve import language_codes
from .config import read_run_config
from .loading import apply_run_delta, load_base_model, load_sparse_model


@dataclass
class RunEvaluation:
    run: Path
    language: str  # the language the run trained
    scores: dict[str, dict]  # language -> {"tokens", "base_loss", "tuned_loss", "base_perplexity", ...}

    def lines(self) -> list[str]:
        rows = [f"{'language':<10} {'tokens':>9} {'ppl before':>11} {'ppl after':>10} {'change':>8} "
                f"{'bpc before':>11} {'bpc after':>10}"]
        for code, s in self.scores.items():
            mark = " (trained)" if code == self.language else ""
            rows.append(f"{code:<10} {s['tokens']:>9,} {s['base_perplexity']:>11.3f} {s['tuned_perplexity']:>10.3f} "
                        f"{100 * (s['tuned_perplexity'] / s['base_perplexity'] - 1):>+7.2f}% "
                        f"{s['base_bits_per_character']:>11.4f} {s['tuned_bits_per_character']:>10.4f}{mark}")
        return rows


def evaluate_run(folder: str | Path, data: str, languages: list[str] | str | None, *, manifest: Manifest,
                 tokens: int = 100_000, seq_len: int = 512, batch_size: int = 4, dtype: str | None = None,
                 device: str | None = None, text_field: str | None = None, token: str | None = None,
                 trust_remote_code: bool = False, allow_other_base: bool = False) -> RunEvaluation:
    """Perplexity and bits per character per language, before (base model) and after (base + delta) a
    run, on held-out text, measured exactly as ``ablate`` measures them (:mod:`..evaluation.heldout`).

    The tuned model is measured UNMERGED (the base weights plus the float32 deltas, or the float32 PEFT
    adapter of a lora / ia3 run, in the forward pass), which loses nothing to merging in any dtype; dense
    baselines load their saved weights in the run's dtype (their float32 master weights rounded as the
    training's own forward passes used them).
    """
    folder = Path(folder)
    config = read_run_config(folder)
    trained = config.language.code
    codes = language_codes(languages, manifest) if languages else [trained]
    sources = {code: resolve_corpus(data, manifest.language(code), manifest, text_field) for code in codes}
    base = load_base_model(folder, dtype=dtype, device=device, token=token, trust_remote_code=trust_remote_code,
                           allow_other_base=allow_other_base, tokenizer=True)
    heldout = {code: heldout_text(source, code, base.tokenizer, seq_len, tokens) for code, source in sources.items()}
    scores: dict[str, dict] = {code: {"tokens": h.tokens, "characters": h.characters} for code, h in heldout.items()}

    def record(label: str, model, model_device) -> None:
        for code, text in heldout.items():
            result: Score = score(model, text, batch_size=batch_size, device=model_device)
            scores[code][f"{label}_loss"] = result.loss
            scores[code][f"{label}_perplexity"] = result.perplexity
            scores[code][f"{label}_bits_per_character"] = result.bits_per_character

    record("base", base.model, base.device)
    if config.dense:
        del base
        tuned = load_sparse_model(folder, dtype=dtype, device=device, token=token,
                                  trust_remote_code=trust_remote_code)
        record("tuned", tuned, next(tuned.parameters()).device)
    else:
        apply_run_delta(base.model, folder, merge=False)
        record("tuned", base.model, base.device)
    return RunEvaluation(folder, trained, scores)
