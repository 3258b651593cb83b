"""Student configuration: one dataclass schema, read from YAML, checked against the ANE rules.

A config file holds the architecture and the student fields under `model:`; run settings
(data, steps, losses) sit beside it at the top level and belong to the commands that use them:

    model:
      role: judge                   # worker | judge | drafter | pilot | test
      contexts: [512, 1024, 2048]   # enumerated KV-cache lengths of the exported decode
      prefill_lengths: [64, 128]    # enumerated prefill chunk lengths
      tokenizer: models/...         # model folder whose tokenizer the student shares
      hidden_size: 3072
      ...                           # the rest are mlx-lm / Hugging Face llama names

Every violation is collected and reported at once, each with its file, line and field.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from . import rope

ROLES = ("worker", "judge", "drafter", "pilot", "test")
HEAD_DIMS = (64, 128)
WIDTH_MULTIPLE = 64
ANE_MAX_DIM = 16384  # largest size of one tensor axis the ANE takes (the vocab is split)

# The `student` block of config.json: our fields, beside the llama ones mlx-lm reads.
STUDENT_FIELDS = ("role", "contexts", "prefill_lengths", "tokenizer", "qat", "judge")


class ConfigError(ValueError):
    """A config with one or more problems, all listed in the message."""


@dataclass
class StudentConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {rope_type: linear | llama3, factor, ...}: mlx_student.rope
    tie_word_embeddings: bool = True
    max_position_embeddings: Optional[int] = None
    role: str = "pilot"
    contexts: List[int] = field(default_factory=lambda: [2048])
    prefill_lengths: List[int] = field(default_factory=lambda: [64, 128])
    tokenizer: Optional[str] = None
    qat: Optional[dict] = None  # set on a QAT checkpoint: {bits, group_size, embeddings}
    judge: Optional[dict] = None  # set on a judge checkpoint (arbiter.judge.model.JudgeSpec)

    def __post_init__(self):
        if self.max_position_embeddings is None and isinstance(self.contexts, list):
            self.max_position_embeddings = max(self.contexts, default=None)

    def to_mlx_config(self) -> dict:
        """config.json of an mlx-lm model folder: llama fields plus a `student` block."""
        d = dataclasses.asdict(self)
        student = {k: d.pop(k) for k in STUDENT_FIELDS}
        for key in ("qat", "judge"):  # only a QAT / judge checkpoint records it
            if student[key] is None:
                del student[key]
        scaling = rope.normalize(d.pop("rope_scaling"))
        if scaling:
            d["rope_scaling"] = scaling
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            # mlx-lm reads rope_theta, transformers 5 reads rope_parameters: write both.
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta},
            **d,
            "student": student,
        }

    @classmethod
    def from_mlx_config(cls, config: dict) -> "StudentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.update(config.get("student", {}))
        return cls(**values)


def _field_types():
    return {f.name: f.type for f in dataclasses.fields(StudentConfig)}


def _check_types(values: dict) -> List[tuple]:
    problems = []
    for name, typ in _field_types().items():
        if name not in values:
            continue
        v = values[name]
        if typ is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.append((name, f"must be a positive integer, got {v!r}"))
        elif typ is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            problems.append((name, f"must be a positive number, got {v!r}"))
        elif typ is bool and not isinstance(v, bool):
            problems.append((name, f"must be true or false, got {v!r}"))
        elif typ == Optional[int] and v is not None and (
            isinstance(v, bool) or not isinstance(v, int) or v <= 0
        ):
            problems.append((name, f"must be a positive integer or null, got {v!r}"))
        elif typ == List[int] and (
            not isinstance(v, list)
            or not v
            or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in v)
        ):
            problems.append((name, f"must be a non-empty list of positive integers, got {v!r}"))
        elif typ == Optional[dict] and v is not None and not isinstance(v, dict):
            problems.append((name, f"must be a mapping or null, got {v!r}"))
        elif typ == Optional[str] and v is not None and not isinstance(v, str):
            problems.append((name, f"must be a string or null, got {v!r}"))
        elif typ is str and not isinstance(v, str):
            problems.append((name, f"must be a string, got {v!r}"))
    return problems


def _check_rules(c: StudentConfig) -> List[tuple]:
    p = rope.check(c.rope_scaling)
    if c.role not in ROLES:
        p.append(("role", f"{c.role!r} is not one of {', '.join(ROLES)}"))
    for name in ("hidden_size", "intermediate_size"):
        if getattr(c, name) % WIDTH_MULTIPLE:
            p.append((name, f"{getattr(c, name)} is not a multiple of {WIDTH_MULTIPLE}"))
    if c.head_dim not in HEAD_DIMS:
        p.append(("head_dim", f"{c.head_dim} is not one of {HEAD_DIMS} (ANE-friendly sizes)"))
    if c.num_attention_heads % c.num_key_value_heads:
        p.append(
            (
                "num_key_value_heads",
                f"{c.num_attention_heads} attention heads are not divisible by "
                f"{c.num_key_value_heads} KV heads",
            )
        )
    axes = {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads * c.head_dim,
        "num_key_value_heads": c.num_key_value_heads * c.head_dim,
    }
    for name, size in axes.items():
        if size > ANE_MAX_DIM:
            p.append((name, f"gives an axis of {size} > {ANE_MAX_DIM}, the ANE's limit"))
    ctx = c.contexts
    if ctx != sorted(set(ctx)):
        p.append(("contexts", f"{ctx} must be strictly increasing"))
    if max(ctx) > ANE_MAX_DIM:
        p.append(("contexts", f"{max(ctx)} > {ANE_MAX_DIM}, the ANE's limit for one axis"))
    if c.max_position_embeddings < max(ctx):
        p.append(
            (
                "max_position_embeddings",
                f"{c.max_position_embeddings} is below the largest context {max(ctx)}",
            )
        )
    pre = c.prefill_lengths
    if pre != sorted(set(pre)):
        p.append(("prefill_lengths", f"{pre} must be strictly increasing"))
    if max(pre) > min(ctx):
        p.append(("prefill_lengths", f"{max(pre)} exceeds the smallest context {min(ctx)}"))
    return p


def validate(values: dict) -> tuple:
    """Check a `model:` mapping. Returns (StudentConfig or None, [(field, problem), ...])."""
    if not isinstance(values, dict):
        return None, [("", f"must be a mapping of fields, got {type(values).__name__}")]
    types = _field_types()
    problems = [(k, "unknown field") for k in values if k not in types]
    missing = dataclasses.MISSING
    required = [
        f.name
        for f in dataclasses.fields(StudentConfig)
        if f.default is missing and f.default_factory is missing
    ]
    typed = [(k, "missing (required)") for k in required if k not in values]
    typed += _check_types(values)
    problems += typed
    if typed:  # the ANE rules need well-typed values; unknown fields do not stop them
        return None, problems
    config = StudentConfig(**{k: v for k, v in values.items() if k in types})
    problems += _check_rules(config)
    return (None if problems else config), problems


def _key_lines(node, prefix="") -> dict:
    """Map dotted keys of a composed YAML mapping to their 1-based line numbers."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            lines[key] = k.start_mark.line + 1
            lines.update(_key_lines(v, key + "."))
    return lines


def load_yaml(path) -> tuple:
    """Read a YAML file. Returns (data, {dotted key: line})."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must hold a mapping, got {type(data).__name__}")
    return data, lines


def load_config(path, base: Optional[dict] = None) -> StudentConfig:
    """Read and validate the `model:` section of a YAML config file. `base` (the fields of
    a model a run starts from, mlx_student.prune.base_config) fills what `model:` omits."""
    data, lines = load_yaml(path)
    if "model" not in data and base is None:
        raise ConfigError(f"{path}: no `model:` section")
    model = data.get("model") or {}
    config, problems = validate({**base, **model} if base and isinstance(model, dict) else model)
    if problems:
        msgs = []
        for name, problem in problems:
            key = f"model.{name}" if name else "model"
            parents = [key.rsplit(".", i)[0] for i in range(key.count(".") + 1)]
            line = next((lines[k] for k in parents if k in lines), None)
            msgs.append(f"  {path}:{line}: {key}: {problem}")
        n = len(problems)
        raise ConfigError(f"{path}: {n} problem{'s' * (n > 1)}:\n" + "\n".join(msgs))
    return config


def apply_config(args, defaults: dict, skip=(), what="setting") -> tuple:
    """Fill the unset (None) attributes of parsed `args` from the YAML file `args.config`,
    then from `defaults`: flags over the file over the defaults, as in mlx_lm.lora. Keys in
    `skip` are left to the caller; any other key not in `defaults` is an error naming the file
    and line. Returns the file's (settings, {key: line})."""
    settings, lines = load_yaml(args.config) if args.config else ({}, {})
    settings = {k: v for k, v in settings.items() if k not in skip}
    unknown = [k for k in settings if k not in defaults]
    if unknown:
        raise ConfigError("\n".join(f"{args.config}:{lines[k]}: {k}: unknown {what}" for k in unknown))
    for key, value in {**defaults, **settings}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return settings, lines
