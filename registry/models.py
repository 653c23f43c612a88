"""Loading a causal LM (the one loader, with one error mapping), finding in each decoder layer the
activation whose sign LAPE counts, and describing the model for provenance (``model_info``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SettingsError, UnknownModel, UnsupportedArchitecture
from .files import atomic_write_text
from .hubcalls import first_line
from .layouts import LAYOUTS, SUPPORTED, Layout
from .limits import load_json
from .options import DTYPE_CHOICES, LoadOptions, load_options
from .provenance import ModelInfo
from .resolve import ModelRef

log = logging.getLogger("neuronreg")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@dataclass(frozen=True)
class MLPSite:
    """One decoder layer's MLP: where to read its neurons' activations."""

    layer: int
    layout: str
    mlp: nn.Module
    projection: nn.Module
    activation: nn.Module
    intermediate_size: int

    @property
    def spec(self) -> Layout:
        return next(layout for layout in LAYOUTS if layout.name == self.layout)


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2), and neuronreg's wrapped projections
        return int(module.nf)
    raise UnsupportedArchitecture(f"Cannot read the width of {type(module).__name__}. Supported: {SUPPORTED}.")


def find_mlp_sites(model: nn.Module) -> list[MLPSite]:
    """The MLP of every decoder layer, in layer order, or UnsupportedArchitecture."""
    decoder = body(model)
    matches: list[tuple[str, nn.Module, Layout]] = []
    for name, module in decoder.named_modules():
        for layout in LAYOUTS:
            if all(isinstance(getattr(module, a, None), nn.Module) for a in (layout.first, layout.activation,
                                                                            layout.second)):
                matches.append((name, module, layout))
                break
    if not matches:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no MLP layout that neuronreg can hook. Supported: {SUPPORTED}."
        )
    # Only the decoder's own stack counts: all matches must be children of one ModuleList.
    parents = {name.rsplit(".", 2)[0] if name.count(".") >= 1 else "" for name, _, _ in matches}
    if len(parents) > 1 or len({layout.name for _, _, layout in matches}) > 1:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} mixes several MLP stacks ({', '.join(sorted(parents))}); neuronreg needs one "
            f"decoder stack. Supported: {SUPPORTED}."
        )
    sites = []
    for layer, (_, module, layout) in enumerate(matches):
        projection = getattr(module, layout.first)
        width = _out_features(projection)
        if width % layout.rows_per_neuron:
            raise UnsupportedArchitecture(f"{layout.first} of layer {layer} has an odd width {width}; cannot split "
                                          "gate/up.")
        sites.append(MLPSite(layer, layout.name, module, projection, getattr(module, layout.activation),
                             width // layout.rows_per_neuron))
    # A hook on an activation module shared between layers could not tell the layers apart.
    if len({id(site.activation) for site in sites}) != len(sites):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} shares one activation module between layers, so its layers cannot be told "
            f"apart. Supported: {SUPPORTED}."
        )
    return sites


def body(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head: what to call for a forward pass that skips the head.

    A PEFT wrapper is looked through first: its ``base_model`` is PEFT's tuner holding the whole causal
    LM (head included), not the body, and the adapter's layers sit inside the body anyway."""
    unwrap = getattr(model, "get_base_model", None)
    if callable(unwrap):
        model = unwrap()
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def hidden_size_of(config) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    ref: ModelRef
    revision: str  # exact commit on the Hub, or a content fingerprint of a local folder
    sites: list[MLPSite]
    hidden_size: int | None
    dtype: str
    device: str

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def intermediate_size(self) -> int:
        return self.sites[0].intermediate_size

    def info(self) -> ModelInfo:
        return model_info(self.model, self.ref, self.revision, self.sites)


def model_info(model: nn.Module, ref: ModelRef, revision: str | None, sites: list[MLPSite] | None = None
               ) -> ModelInfo:
    """The one description of a model that provenance, runs and reports record.

    A local folder is named, not located: provenance travels to the Hub, the user's paths do not.
    """
    sites = sites or find_mlp_sites(model)
    base_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("delta"))
    return ModelInfo(
        name=ref.name, id=Path(ref.source).name if ref.local and ref.source else ref.source, revision=revision,
        num_layers=len(sites), intermediate_size=sites[0].intermediate_size,
        hidden_size=hidden_size_of(getattr(model, "config", None)), architecture=type(model).__name__,
        mlp_layout=sites[0].layout, num_parameters=int(base_params),
    )


# -- local folders: a content fingerprint --------------------------------------------------------------
# Besides the config and the weights, what decides the counts of a text: how it is tokenized, and code a
# folder brings along (trust_remote_code).
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model", "qwen.tiktoken"}
TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".spm")
FINGERPRINT_PREFIX = "local-v2-"
# neuronreg 0.2's fingerprints, of the config and weight files only: 'local-' and 16 hex digits.
LEGACY_FINGERPRINT = re.compile(r"local-[0-9a-f]{16}")


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "neuronreg" / "file-hashes.json"


def file_sha256(path: Path, cache: dict | None = None) -> str:
    """The sha256 of a file's bytes; ``cache`` maps a file's path and stat to its hash, so that a 16 GB
    checkpoint is hashed once, not on every run.

    The key holds the change time (ctime) besides size, mtime and inode: a file rewritten in place and
    given back its old mtime (``touch -d``, ``os.utime``, an archive restored) has a new ctime, which
    no program can set, so it is hashed again."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}|{stat.st_dev}"
    if cache is not None and isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if cache is not None:
        cache[key] = digest.hexdigest()
    return digest.hexdigest()


def fingerprint_files(folder: Path) -> list[Path]:
    """The files of a local model whose bytes decide what it computes: config, weights (and their
    index), tokenizer files, and Python files (code that ``trust_remote_code`` runs)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")
        or p.name in TOKENIZER_FILES or p.suffix in TOKENIZER_SUFFIXES or p.suffix == ".py"))


def local_fingerprint(folder: Path) -> str:
    """A content id for a local model: the sha256 of the bytes of every file :func:`fingerprint_files`
    names (hashes cached by path and stat, see :func:`file_sha256`). Other weights of the same size,
    or another tokenizer, give another fingerprint."""
    folder = Path(folder)
    with _hash_cache() as cache:
        digest = hashlib.sha256()
        for path in fingerprint_files(folder):
            digest.update(f"{path.name}:{file_sha256(path, cache)}\n".encode())
    return FINGERPRINT_PREFIX + digest.hexdigest()[:16]


def legacy_fingerprint(folder: Path) -> str:
    """The fingerprint neuronreg 0.2 gave a local model (its config and weight files only)."""
    folder = Path(folder)
    with _hash_cache() as cache:
        digest = hashlib.sha256(file_sha256(folder / "config.json", cache).encode())
        for path in sorted(folder.iterdir()):
            if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")):
                digest.update(f"{path.name}:{file_sha256(path, cache)}".encode())
    return "local-" + digest.hexdigest()[:16]


def older_fingerprint(folder: Path, recorded: str | None, used: str) -> str | None:
    """When ``recorded`` is a fingerprint of an older neuronreg (before it covered the tokenizer): what
    that means for ``folder``, to end a message ('... by fingerprint <this>'); else None. ``used`` says
    what the tokenizer was used for ('they were counted with')."""
    if not recorded or not LEGACY_FINGERPRINT.fullmatch(recorded):
        return None
    same = "its config and weights are the same" if legacy_fingerprint(folder) == recorded else \
        "its config or weights have changed as well"
    return (f"{recorded}, made by an older neuronreg whose fingerprints did not cover the tokenizer: whether "
            f"{Path(folder).name} still has the tokenizer {used} cannot be told ({same}).")


@contextmanager
def _hash_cache():
    """The file hash cache, written back (its newest 2,000 entries) when it gained any."""
    cache_path = _cache_file()
    try:
        cache = load_json(cache_path.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    size = len(cache)
    yield cache
    if len(cache) != size:
        try:
            atomic_write_text(cache_path, json.dumps(dict(list(cache.items())[-2000:])))
        except OSError:  # a read-only home only costs hashing again next time
            pass


# -- devices and dtypes ------------------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """The device to use, checked BEFORE any weights are loaded."""
    device = device or default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise SettingsError(f"Unknown device {device!r}; use cpu, cuda, cuda:1, mps ...", fix="device") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"Device {device!r} was asked for, but this machine has no CUDA GPU.", fix="device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SettingsError(f"Device {device!r} was asked for, but this machine has "
                                f"{torch.cuda.device_count()} GPU(s).", fix="device")
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingsError(f"Device {device!r} was asked for, but MPS is not available here.", fix="device")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise SettingsError(f"Device {device!r} is not supported; use cpu or cuda.", fix="device")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError as exc:
        raise SettingsError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}.") from exc


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- loading -------------------------------------------------------------------------------------------
def load_model(ref: ModelRef, options: LoadOptions | None = None, *, revision: str | None = None,
               tokenizer: bool = True) -> LoadedModel:
    """Load weights (and the tokenizer) as ``options`` say. Remote code runs only when they ask for it.

    ``revision`` pins a Hub commit (a run's recorded base); by default the manifest's pin or main.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .progress import progress_bars_disabled

    options = load_options(options)
    device_map, token, trust_remote_code = options.device_map, options.token, options.trust_remote_code
    if ref.source is None:
        raise UnknownModel(f"The registry knows {ref.name} only by name, not where its weights are.",
                           fix="model_source", advice="Give its Hub id or local folder.")
    if progress_bars_disabled():
        hf_logging.disable_progress_bar()
    if device_map:
        from .extras import require

        require("accelerate", "gpu", "Spreading a model over devices (device_map) needs accelerate")
    device = check_device(options.device) if not device_map else (options.device or default_device())
    torch_dtype = parse_dtype(options.dtype, device)
    kwargs = dict(revision=revision or ref.revision, trust_remote_code=trust_remote_code, token=token)
    try:
        config = AutoConfig.from_pretrained(ref.source, **kwargs)
        extra = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(ref.source, config=config, dtype=torch_dtype, **kwargs, **extra)
        tok = AutoTokenizer.from_pretrained(ref.source, **kwargs) if tokenizer else None
    except Exception as exc:
        raise load_error(ref, exc) from exc
    if device_map:
        # accelerate placed the layers; token ids go where the embeddings are.
        device = str(model.get_input_embeddings().weight.device)
        model.eval()
    else:
        model.eval().to(device)
    sites = find_mlp_sites(model)
    if ref.local:
        revision = local_fingerprint(Path(ref.source))
    else:
        revision = getattr(config, "_commit_hash", None) or revision or ref.revision or "main"
    return LoadedModel(model, tok, ref, revision, sites, hidden_size_of(config), dtype_name(torch_dtype), device)


def load_error(ref: ModelRef, exc: BaseException) -> Exception:
    """The one mapping of what transformers and the Hub raise while loading to a neuronreg error."""
    from .hubcalls import hub_error

    mapped = hub_error(exc, ref.source or ref.name)
    if mapped is not None:
        return mapped
    text = str(exc)
    if isinstance(exc, ValueError) and ("Unrecognized configuration class" in text or "does not support" in text
                                        or "Unrecognized model" in text):
        return UnsupportedArchitecture(f"{ref.describe()} is not a causal LM that transformers can load. "
                                       f"Supported: {SUPPORTED}.")
    if isinstance(exc, ImportError):
        return UnknownModel(f"Loading {ref.describe()} needs another package: {first_line(exc)}")
    if isinstance(exc, (OSError, ValueError, KeyError, json.JSONDecodeError, EnvironmentError)):
        return UnknownModel(f"Cannot load model {ref.describe()}: {first_line(exc)}")
    if isinstance(exc, MemoryError):
        return UnknownModel(f"Not enough memory to load {ref.describe()}.", fix="memory",
                            advice="Use a smaller dtype or a machine with more memory.")
    return UnknownModel(f"Cannot load model {ref.describe()}: {type(exc).__name__}: {first_line(exc)}")
