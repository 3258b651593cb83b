"""config.json of a model folder, read once, the way mlx-lm and transformers read it.

Every reader of a folder this project did not write goes through `read_config` (its fields) or
`load` (the MLX model): `init_from` (mlx_student.finetune), the student loader
(mlx_student.model.load), the exporter's checkpoint reader (export/mirror.py), the probe and
parity references (export/taps.py, export/parity.py) and the local teacher. Folders come from
mlx-lm (`mlx_lm.convert`, `mlx_lm.fuse`), transformers 4 and 5 (`save_pretrained`) and this
project; where they disagree the folder is read as the tool that wrote it meant it, or refused
with the file and the key named, never read silently wrong:

    rope_theta            transformers 5 writes only `rope_parameters: {rope_type, rope_theta, ...}`;
                          mlx-lm's llama reads only the top-level `rope_theta` (and would use
                          10000). Both given and different: refused.
    rope_scaling          the legacy `rope_scaling` mapping, or the scaling fields of
                          `rope_parameters` (transformers 5) when its `rope_type` is not
                          `default`: checked by mlx_student.rope (linear, llama3; any other kind
                          refused naming `<key>.rope_type` or `.type`) and normalized.
    tie_word_embeddings   false with no `lm_head.weight` in the weights: refused. True (or mlx-lm's
                          default, absent) with an `lm_head.weight` equal to the embedding: tied;
                          with one that differs: refused (mlx-lm drops it without a word), the
                          message saying to set the key to false to use it. Absent with an
                          `lm_head.weight`: untied (transformers' llama default is false).
    quantization          mlx-lm's own block. A `quantization_config` without `quant_method` (the
                          copy mlx_lm.convert writes beside it, left alone) is read as that block;
                          a `quant_method` mlx-lm does not load is refused by name.

`mlx_overrides(config)` gives the fields mlx_lm.load must be told (its `model_config`) so that
mlx-lm builds the same model. Raises FolderConfigError (a ConfigError) naming the file and key.
"""

import json
from pathlib import Path

import numpy as np

from . import rope
from .config import ConfigError

ROPE_THETA_DEFAULT = 10000.0  # transformers' and mlx-lm's llama default
# quant_method values mlx_lm.utils.load_model knows (mlx-lm 0.32)
MLX_QUANT_METHODS = ("bitnet", "mxfp4", "mxfp8", "fp8", "compressed-tensors", "modelopt", "awq",
                     "gptq")


class FolderConfigError(ConfigError):
    """A model folder's config.json that cannot be read as its writer meant it."""


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FolderConfigError(f"{path.parent}: not a model folder (no config.json)") from None
    except OSError as e:
        raise FolderConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise FolderConfigError(f"{path}:{getattr(e, 'lineno', 1)}: invalid JSON: "
                                f"{getattr(e, 'msg', e)}") from None
    if not isinstance(raw, dict):
        raise FolderConfigError(f"{path}:1: expected a JSON object, got {type(raw).__name__}")
    return raw


def _rope(path: Path, raw: dict) -> tuple:
    """(theta, scaling) of the folder's RoPE: scaling normalized by mlx_student.rope (None for
    plain RoPE); kinds the student does not compute are refused naming the key."""
    params, scaling = raw.get("rope_parameters"), raw.get("rope_scaling")
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is not None and not isinstance(block, dict):
            raise FolderConfigError(f"{path}: {key}: expected an object, got {block!r}")
    source = "rope_scaling"
    if scaling is None and rope.scaling_type(params) != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        source = "rope_parameters"
    problems = rope.check(scaling)
    if problems:
        raise FolderConfigError(f"{path}: " + "; ".join(
            f"{source}{field.removeprefix('rope_scaling')}: {p}" for field, p in problems))
    theta = raw.get("rope_theta")
    inner = (params or {}).get("rope_theta")
    if theta is not None and inner is not None and float(theta) != float(inner):
        raise FolderConfigError(f"{path}: rope_theta {theta} and rope_parameters.rope_theta "
                                f"{inner} differ")
    theta = theta if theta is not None else inner
    if theta is None:
        return ROPE_THETA_DEFAULT, rope.normalize(scaling)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise FolderConfigError(f"{path}: rope_theta: must be a positive number, got {theta!r}")
    return float(theta), rope.normalize(scaling)


def _quantization(path: Path, raw: dict):
    """mlx-lm's quantization block of the folder, or None; refuses what mlx-lm cannot load."""
    if raw.get("quantization") is not None:
        return raw["quantization"]
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise FolderConfigError(f"{path}: quantization_config: expected an object, got {qc!r}")
    method = qc.get("quant_method")
    if method is None:
        if "bits" in qc and "group_size" in qc:
            return qc  # mlx_lm.convert's copy of its own block
        raise FolderConfigError(f"{path}: quantization_config: no quant_method and no "
                                "bits / group_size (mlx-lm's form): cannot tell the format")
    if method not in MLX_QUANT_METHODS:
        raise FolderConfigError(f"{path}: quantization_config.quant_method: {method!r} is not "
                                f"a format mlx-lm loads ({', '.join(MLX_QUANT_METHODS)})")
    return None  # mlx-lm reads it itself


def weight_files(folder: Path) -> list:
    """The safetensors files of a folder: the index's shards, else model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in _read_json(index)["weight_map"].values()})
    return sorted(folder.glob("model*.safetensors"))


def _names(f: Path) -> set:
    from safetensors import safe_open

    with safe_open(str(f), "numpy") as st:
        return set(st.keys())


def _get(f: Path, name: str) -> np.ndarray:
    """One tensor as fp32 numpy (bf16 included, which numpy cannot hold)."""
    from safetensors import safe_open

    with safe_open(str(f), "pt") as st:
        return st.get_tensor(name).float().numpy()


def _tied(path: Path, raw: dict, files: list) -> bool:
    """tie_word_embeddings as the weights bear it out (see the module docstring)."""
    tie = raw.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise FolderConfigError(f"{path}: tie_word_embeddings: must be true or false, got {tie!r}")
    names = {f: _names(f) for f in files}
    head = next((f for f in files if "lm_head.weight" in names[f]), None)
    if head is None:
        if tie is False:
            raise FolderConfigError(f"{path}: tie_word_embeddings is false but the weights "
                                    f"({', '.join(f.name for f in files)}) hold no "
                                    "lm_head.weight")
        return True
    if tie is None:
        return False
    if tie:
        embed = next((f for f in files if "model.embed_tokens.weight" in names[f]), None)
        h = _get(head, "lm_head.weight")
        e = _get(embed, "model.embed_tokens.weight") if embed else None
        if e is None or e.shape != h.shape or not np.array_equal(e, h):
            raise FolderConfigError(
                f"{path}: tie_word_embeddings is true but {head.name} holds an lm_head.weight "
                "that differs from model.embed_tokens.weight; set tie_word_embeddings to false "
                "to use it, or remove it to tie")
    return tie


def read_config(folder) -> dict:
    """config.json of `folder` with its fields normalized for the llama of mlx-lm and this
    project: `rope_theta`, `tie_word_embeddings` and `quantization` (None when not quantized)
    always set, as the folder's writer meant them (module docstring). The raw file's other keys
    are kept. Raises FolderConfigError naming the file and key."""
    folder = Path(folder)
    path = folder / "config.json"
    raw = _read_json(path)
    config = dict(raw)
    config["rope_theta"], config["rope_scaling"] = _rope(path, raw)
    if config["rope_scaling"] is None:
        config.pop("rope_scaling")
    config["quantization"] = _quantization(path, raw)
    if config["quantization"] is not None:
        config.pop("quantization_config", None)
    files = weight_files(folder)
    config["tie_word_embeddings"] = _tied(path, raw, files) if files else \
        raw.get("tie_word_embeddings", True)
    return config


def mlx_overrides(config: dict) -> dict:
    """`model_config` for mlx_lm.load / load_model: the normalized fields, so that mlx-lm (which
    reads only the top-level rope_theta, defaults tie_word_embeddings to true and reads
    `quantization_config` only with a quant_method) builds the model `config` describes."""
    out = {"rope_theta": config["rope_theta"],
           "tie_word_embeddings": config["tie_word_embeddings"]}
    if config.get("rope_scaling"):
        out["rope_scaling"] = config["rope_scaling"]
    if config.get("quantization") is not None:
        out["quantization"] = config["quantization"]
    return out


def load(path_or_hf_repo, **kwargs):
    """mlx_lm.load with the folder read by `read_config` (a Hugging Face repo id, `owner/name`,
    is fetched first, as mlx_lm.load does). Returns what mlx_lm.load returns: (model,
    tokenizer). Raises FolderConfigError for a folder that does not exist or cannot be read."""
    from mlx_lm.utils import _download
    from mlx_lm.utils import load as mlx_lm_load

    folder = Path(path_or_hf_repo)
    if not folder.exists():
        repo = str(path_or_hf_repo)
        if repo.startswith(("/", ".", "~")) or repo.count("/") != 1:
            raise FolderConfigError(f"{repo}: no such model folder")
        try:
            folder = Path(_download(repo))
        except Exception as e:  # noqa: BLE001 (offline, unknown repo, ...: the hub's reason)
            raise FolderConfigError(f"{repo}: no such model folder, and not a Hugging Face "
                                    f"repo that can be fetched ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
    config = read_config(folder)
    check_mlx_model(folder / "config.json", config)
    return mlx_lm_load(str(folder), model_config=mlx_overrides(config), **kwargs)


def check_mlx_model(path: Path, config: dict) -> None:
    """Refuse, naming the file and key, a config.json mlx-lm has no model for or whose model
    arguments it lacks (transformers 5's GPT-2 writes no `n_ctx`, which mlx-lm's gpt2 needs: a
    TypeError deep in mlx_lm.load otherwise). Raises FolderConfigError."""
    import inspect

    from mlx_lm.utils import _get_classes

    kind = config.get("model_type")
    if not isinstance(kind, str):
        raise FolderConfigError(f"{path}: model_type: missing (mlx-lm picks the model by it)")
    try:
        _, model_args = _get_classes(config)
    except ValueError:
        raise FolderConfigError(f"{path}: model_type {kind!r}: not a model mlx-lm has "
                                "(mlx_lm.models)") from None
    given = {**config, **mlx_overrides(config)}
    missing = [name for name, p in inspect.signature(model_args).parameters.items()
               if p.default is inspect.Parameter.empty and name not in given]
    if missing:
        raise FolderConfigError(f"{path}: model_type {kind!r}: mlx-lm's {kind} model needs "
                                f"{', '.join(missing)}, which the file lacks")
