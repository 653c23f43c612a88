"""Loading a causal LM and finding, in each decoder layer, the activation whose sign LAPE counts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UnknownModel, UnsupportedArchitecture
from .manifest import Manifest

# The MLP layouts neuronreg knows. Each names the attributes an MLP module holds: the projection
# that makes the intermediate activations, the activation module whose OUTPUT is counted, and how
# the intermediate size follows from the projection (the fused gate_up_proj holds gate then up).
MLP_LAYOUTS = (
    # name, first projection, activation module, projection rows per neuron, second projection
    ("gated", "gate_proj", "act_fn", 1, "down_proj"),  # Llama, Mistral, Qwen2/3, Gemma 2/3, Cohere
    ("fused-gated", "gate_up_proj", "activation_fn", 2, "down_proj"),  # Phi-3
    ("gpt2", "c_fc", "act", 1, "c_proj"),  # GPT-2
    ("fc", "fc1", "activation_fn", 1, "fc2"),  # OPT (on the decoder layer), Phi-1/2
    ("bloom", "dense_h_to_4h", "gelu_impl", 1, "dense_4h_to_h"),  # BLOOM
)
SUPPORTED = (
    "gated MLPs with gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2/3, Gemma 2/3, Cohere/Aya), "
    "Phi-3's fused gate_up_proj, GPT-2 (c_fc), OPT and Phi-2 (fc1), BLOOM (dense_h_to_4h)"
)


@dataclass(frozen=True)
class MLPSite:
    """One decoder layer's MLP: where to read its neurons' activations."""

    layer: int
    layout: str
    mlp: nn.Module
    projection: nn.Module
    activation: nn.Module
    intermediate_size: int


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2)
        return int(module.nf)
    raise UnsupportedArchitecture(f"Cannot read the width of {type(module).__name__}. Supported: {SUPPORTED}.")


def find_mlp_sites(model: nn.Module) -> list[MLPSite]:
    """The MLP of every decoder layer, in layer order, or UnsupportedArchitecture."""
    decoder = _decoder(model)
    matches: list[tuple[str, nn.Module, tuple]] = []
    for name, module in decoder.named_modules():
        for layout in MLP_LAYOUTS:
            _, proj, act, _, out = layout
            if all(isinstance(getattr(module, a, None), nn.Module) for a in (proj, act, out)):
                matches.append((name, module, layout))
                break
    # Only the decoder's own stack counts: all matches must be children of one ModuleList.
    parents = {name.rsplit(".", 2)[0] if name.count(".") >= 1 else "" for name, _, _ in matches}
    if not matches:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no MLP layout that neuronreg can hook. Supported: {SUPPORTED}."
        )
    if len(parents) > 1 or len({layout[0] for _, _, layout in matches}) > 1:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} mixes several MLP stacks ({', '.join(sorted(parents))}); neuronreg needs one "
            f"decoder stack. Supported: {SUPPORTED}."
        )
    sites = []
    for layer, (_, module, layout) in enumerate(matches):
        name, proj, act, rows, _ = layout
        projection = getattr(module, proj)
        width = _out_features(projection)
        if width % rows:
            raise UnsupportedArchitecture(f"{proj} of layer {layer} has an odd width {width}; cannot split gate/up.")
        sites.append(MLPSite(layer, name, module, projection, getattr(module, act), width // rows))
    # A hook on an activation module shared between layers could not tell the layers apart.
    if len({id(site.activation) for site in sites}) != len(sites):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} shares one activation module between layers, so its layers cannot be told "
            f"apart. Supported: {SUPPORTED}."
        )
    return sites


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (the head is never needed for counting)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def body(model: nn.Module) -> nn.Module:
    """What to call for a forward pass that skips the LM head."""
    return _decoder(model)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str  # Hub id, or the absolute path of a local folder
    revision: str  # exact commit on the Hub, or a content fingerprint of a local folder
    name: str  # the registry name: the manifest alias when there is one
    sites: list[MLPSite]
    hidden_size: int
    dtype: str
    device: str

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def intermediate_size(self) -> int:
        return self.sites[0].intermediate_size


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from, resolved before any weights are loaded."""

    source: str  # Hub id or local folder path
    revision: str | None
    name: str
    local: bool


def resolve_model(spec: str, manifest: Manifest, name: str | None = None) -> ModelRef:
    """An alias, a Hub id (``org/name``) or a local folder."""
    if spec in manifest.models:
        entry = manifest.models[spec]
        return ModelRef(entry.hub_id, entry.revision, name or entry.alias, local=False)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(f"Folder {spec} has no config.json; point to a saved transformers model.")
        return ModelRef(str(path.resolve()), None, name or registry_name(path.resolve().name), local=True)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        entry = manifest.model_for_hub_id(spec)
        return ModelRef(spec, entry.revision if entry else None, name or (entry.alias if entry else registry_name(spec)), False)
    import difflib

    close = difflib.get_close_matches(spec, list(manifest.models), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModel(
        f"Unknown model {spec!r}.{hint} Give a manifest alias ('neuronreg models' lists them), a Hub id like "
        "org/name, or a local folder."
    )


def registry_name(model_id: str) -> str:
    """A Hub id made into one folder/config name: 'org/Name' -> 'org--Name'."""
    return model_id.strip("/").replace("/", "--")


def local_fingerprint(folder: Path) -> str:
    """A cheap content id for a local model: config plus every weight file's name and size."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in {".safetensors", ".bin", ".pt", ".gguf"} or path.name.endswith(".index.json"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UnknownModel(f"Unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}.") from None


def load_model(
    ref: ModelRef,
    *,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    quiet: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load weights and tokenizer. Remote code runs only when the caller asks for it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .progress import bars_disabled

    if bars_disabled(quiet):
        hf_logging.disable_progress_bar()

    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    kwargs = dict(revision=ref.revision, trust_remote_code=trust_remote_code, token=token)
    try:
        config = AutoConfig.from_pretrained(ref.source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UnknownModel(f"Cannot load model {ref.source!r}: {_first_line(exc)}") from exc
    try:
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(ref.source, config=config, dtype=torch_dtype, **kwargs, **extra)
        tokenizer = AutoTokenizer.from_pretrained(ref.source, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not support" in str(exc):
            raise UnsupportedArchitecture(
                f"{type(config).__name__} is not a causal LM that transformers can load. Supported: {SUPPORTED}."
            ) from exc
        raise UnknownModel(f"Cannot load model {ref.source!r}: {_first_line(exc)}") from exc
    except OSError as exc:
        raise UnknownModel(f"Cannot load model {ref.source!r}: {_first_line(exc)}") from exc
    except ImportError as exc:
        raise UnknownModel(f"Loading {ref.source!r} needs another package: {_first_line(exc)}") from exc
    if device_map:
        # accelerate placed the layers; token ids go where the embeddings are.
        device = str(model.get_input_embeddings().weight.device)
        model.eval()
    else:
        model.eval().to(device)
    sites = find_mlp_sites(model)
    revision = local_fingerprint(Path(ref.source)) if ref.local else (
        getattr(config, "_commit_hash", None) or ref.revision or "main"
    )
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model")
    return LoadedModel(model, tokenizer, ref.source, revision, ref.name, sites, int(hidden),
                       str(torch_dtype).removeprefix("torch."), device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
