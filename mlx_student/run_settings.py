"""Run settings checked together when the config is read (mlx_student.train, kd_mix).

Each command gives rules {key: rule(value) -> problem or None} (`integer`, `number`, `choice`,
`flag`); `problems(args, rules)` applies them, `train_problems` adds mlx_student.train's loss mix
and the settings that must agree, and `raise_problems` raises one ConfigError listing each as
`FILE:LINE: key: problem` (a setting from the YAML file) or `--flag: problem` (from the command
line), as mlx_student.config does for `model:`. `check_data(args, splits)` does the same for what
needs the data: a batch larger than a split. So a run never starts only to die at its first
step (a jsd_beta of 1, a batch of 8 over 6 examples, a dense KD loss without a teacher) and no
user's mistake ends in a traceback.
"""

from .config import ConfigError
from .losses import LOSSES, TAILS

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def integer(low: int, special=None):
    """Rule: an integer >= low (or the value `special`, e.g. -1 for all)."""
    also = f" (or {special})" if special is not None else ""
    return lambda v: None if (_is_int(v) and (v >= low or v == special)) else \
        f"must be an integer >= {low}{also}, got {v!r}"


def number(ok, wanted: str):
    """Rule: a number for which ok(v) holds."""
    return lambda v: None if _is_number(v) and ok(v) else f"must be {wanted}, got {v!r}"


def choice(values):
    values = list(values)
    return lambda v: None if v in values else f"{v!r} is not one of {', '.join(map(str, values))}"


def flag(v):
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def problems(args, rules: dict) -> list:
    """[(key, problem)] of the settings in `args` (an argparse namespace after apply_config)
    against `rules` {key: rule(value) -> problem or None}."""
    return [(k, msg) for k, rule in rules.items() if (msg := rule(getattr(args, k))) is not None]


DENSE_KD = ("forward_kl", "reverse_kl", "jsd")  # need the teacher's logits in process
TRAIN_RULES = {
    **{k: integer(low) for k, low in (
        ("iters", 1), ("batch_size", 1), ("grad_accumulation_steps", 1), ("max_seq_length", 1),
        ("warmup", 0), ("steps_per_report", 1), ("steps_per_eval", 1), ("steps_per_save", 1),
        ("seed", 0))},
    "val_batches": integer(1, special=-1),
    "num_layers": integer(1, special=-1),
    "learning_rate": number(lambda x: x > 0, "a number > 0"),
    "min_lr_ratio": number(lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "weight_decay": number(lambda x: x >= 0, "a number >= 0"),
    "grad_clip": number(lambda x: x > 0, "a number > 0"),
    "temperature": number(lambda x: x > 0, "a number > 0"),
    # GKD's generalized JSD (mlx_student.losses.jsd): at 0 or 1 it is identically zero
    "jsd_beta": number(lambda x: 0 < x < 1, "a number in (0, 1) (at 0 or 1 the JSD is "
                       "identically 0)"),
    "topk_tail": choice(TAILS),
    **{k: flag for k in ("resume", "skip_bad_lines", "grad_checkpoint")},
}


def train_problems(args, choices: dict) -> list:
    """[(key, problem)] of mlx_student.train's settings: TRAIN_RULES, `choices` {key: allowed
    values} (optimizer, compute_dtype), the loss mix and the settings that must agree."""
    p = problems(args, {**TRAIN_RULES, **{k: choice(v) for k, v in choices.items()}})
    loss = args.loss
    if not isinstance(loss, dict) or not loss:
        return p + [("loss", f"must be a mapping of loss name to weight, got {loss!r}")]
    for name, w in loss.items():
        if name not in LOSSES:
            p.append((f"loss.{name}", f"unknown loss; known: {', '.join(LOSSES)}"))
        elif not _is_number(w) or w < 0:
            p.append((f"loss.{name}", f"the weight must be a number >= 0, got {w!r}"))
    used = [n for n, w in loss.items() if n in LOSSES and _is_number(w) and w > 0]
    if not used and not any(k.startswith("loss.") for k, _ in p):
        p.append(("loss", "every weight is 0: nothing to train"))
    dense = [n for n in used if n in DENSE_KD]
    if dense and not args.teacher:
        p.append(("loss", f"{', '.join(dense)} distil a teacher's full logits: set teacher: "
                          "(an mlx-lm folder), or use topk_kd with the teacher's stored top-k"))
    if ("topk_kd" in used and args.topk_tail != "renorm" and _is_number(args.temperature)
            and args.temperature != 1):
        p.append(("temperature", f"{args.temperature} with topk_tail {args.topk_tail}: the "
                                 "teacher's tail mass is unknown at another temperature; use "
                                 "topk_tail: renorm, or temperature: 1"))
    if (_is_int(args.batch_size) and _is_int(args.grad_accumulation_steps)
            and args.grad_accumulation_steps >= 1 and args.batch_size % args.grad_accumulation_steps):
        p.append(("batch_size", f"{args.batch_size} does not split into "
                                f"{args.grad_accumulation_steps} accumulation steps"))
    return p


def where(key: str, path, lines: dict, given) -> str:
    """`FILE:LINE: key` for a setting read from the config file `path` ({key: line}), `--flag`
    for one given on the command line (`given`: the keys set by flags), else `key (default)`."""
    top = key.split(".")[0]
    if top in given:  # a sub-key of a flag's value: `--qat bits`, `--on-policy lmbda`
        return f"--{top.replace('_', '-')}" + (f" {key.partition('.')[2]}" if "." in key else "")
    if key in lines or top in lines:
        return f"{path}:{lines.get(key, lines.get(top))}: {key}"
    return f"{key} (default)"


def raise_problems(found: list, path, lines: dict, given):
    """One ConfigError listing every (key, problem) of `found`, each where it was set."""
    if found:
        n = len(found)
        raise ConfigError(f"{path or 'the command line'}: {n} setting problem{'s' * (n > 1)}:\n"
                          + "\n".join(f"  {where(k, path, lines, given)}: {problem}"
                                       for k, problem in found))


def from_error(e: ValueError) -> tuple:
    """(key, problem) of a ValueError whose message reads 'key: problem' (the checks of
    mlx_student.finetune, quant.qat_settings and records.process_weights)."""
    key, sep, problem = str(e).partition(": ")
    return (key, problem) if sep and " " not in key else ("", str(e))


def check_data(splits: dict, batch_size: int) -> list:
    """[(key, problem)]: batches must fit the data (the batch size against each split's
    number of sequences; the test split is not batched in training)."""
    return [("batch_size", f"{batch_size} is more than the {len(split.examples)} sequences of "
                           f"{split.path}")
            for name, split in splits.items() if name != "test" and len(split.examples) < batch_size]
