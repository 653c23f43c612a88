"""Tiny real transformers models and a character tokenizer, built from configs (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

LATIN = "abcdefghijklmnopqrstuvwxyz"
CYRILLIC = "абвгдежзийклмнопрстуфхцчшщыэюя"
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
SPECIALS = ["<unk>", "<s>", "</s>"]
SCRIPTS = {"en": LATIN, "ru": CYRILLIC, "el": GREEK}


def vocabulary() -> list[str]:
    return SPECIALS + list(" .,") + list(LATIN) + list(CYRILLIC) + list(GREEK)


def make_tokenizer(bos: bool = False):
    """A character-level fast tokenizer: every character is one token. With ``bos``, it puts ``<s>``
    before every text it encodes (unless ``add_special_tokens=False``), as Gemma's and Llama 3's do."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


HIDDEN, INTER, LAYERS, HEADS = 32, 48, 2, 4
# The neurons planted_model() makes fire on exactly one script, per layer and language.
PLANTED = {0: {"en": [3, 7], "ru": [10], "el": [20]}, 1: {"en": [5], "ru": [30, 31], "el": [40, 41]}}
TOP_RATE = str(9 / 96)  # selects exactly the 9 planted neurons of 2 x 48


def tiny_config(arch: str):
    """One config per supported MLP layout (and a few more gated families)."""
    config = _config(arch)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return config


def _config(arch: str):
    import transformers as t

    v = len(vocabulary())
    common = dict(vocab_size=v, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=512)
    if arch == "llama":
        return t.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return t.MistralConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return t.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "qwen3":
        return t.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma2":
        return t.Gemma2Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma3":
        return t.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **common)
    if arch == "cohere":
        return t.CohereConfig(num_key_value_heads=2, **common)
    if arch == "phi3":
        return t.Phi3Config(num_key_value_heads=4, pad_token_id=0, **common)
    if arch == "phi":
        return t.PhiConfig(**common)
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=v, n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=512)
    if arch == "opt":
        return t.OPTConfig(vocab_size=v, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=512)
    if arch == "bloom":
        return t.BloomConfig(vocab_size=v, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "cohere", "phi3", "phi", "gpt2", "opt", "bloom"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    # Default inits are tiny (std 0.02); larger weights give activations of both signs everywhere.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
    return model.eval()


def save_model(model, folder: Path, bos: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(bos).save_pretrained(folder)
    return folder


def planted_model(per_layer: dict[int, dict[str, list[int]]], seed: int = 0):
    """A Llama whose neuron ``j`` of layer ``l`` fires on the tokens of exactly one script.

    Dimensions 0..2 of the residual stream say "this token is Latin / Cyrillic / Greek" (+1, else
    -1). Attention writes nothing (o_proj = 0) and no MLP writes those dimensions (down_proj rows
    0..2 = 0), so every layer's MLP sees them unchanged up to RMSNorm's positive scale. A planted
    neuron's gate row reads only its script's dimension; every other neuron ignores dimensions 0..2.
    """
    model = tiny_model("llama", seed)
    vocab = vocabulary()
    scripts = list(SCRIPTS)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, :3] = -1.0
        for s, lang in enumerate(scripts):
            for ch in SCRIPTS[lang]:
                emb[vocab.index(ch), s] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight[:3].zero_()
            layer.mlp.gate_proj.weight[:, :3] = 0.0
        for index, langs in per_layer.items():
            gate = model.model.layers[index].mlp.gate_proj.weight
            for lang, neurons in langs.items():
                for j in neurons:
                    gate[j] = 0.0
                    gate[j, scripts.index(lang)] = 5.0
    return model


def write_corpus(folder: Path, langs: dict[str, str], docs: int = 60, seed: int = 0) -> Path:
    """Random 'words' of each language's script, one document per line, no spaces."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for code, file_stem in langs.items():
        letters = SCRIPTS[code]
        lines = ["".join(rng.choice(letters) for _ in range(rng.randint(20, 80))) for _ in range(docs)]
        (folder / f"{file_stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
