"""Students cut from a teacher: importance from forward passes, candidate cuts scored before
training, the best one written as an mlx-lm folder with a prune report.

    mlx_student.prune --teacher models/smollm2-135m-instruct --intermediate 768 --out runs/cut
    mlx_student.prune --config configs/pilot.yaml --out runs/cut    # target shape from `model:`

Importance (Minitron: Muralidharan et al. 2024, arXiv 2407.14679; Sreenivas et al. 2024,
arXiv 2408.11796) comes from forward passes of the teacher over a calibration set (default a
few thousand tokens spread over data/stdlib/train.jsonl):

* depth, two ways: block importance, 1 - mean cos(layer input, layer output) per token
  (ShortGPT, arXiv 2403.03853), and the increase of the teacher's KL when the layer alone is
  dropped (KL(teacher || teacher without layer i), full vocabulary);
* width, by activation magnitude: attention heads by the mean L2 norm of each head's output
  (whole KV groups under GQA, then query heads inside a kept group), MLP neurons by the mean
  |silu(gate) * up|, hidden channels by the mean |RMSNorm output| summed over every norm.

A cut is a choice of depth strategy (`even`: evenly spaced, first and last kept;
`block_importance`; `drop_kl`) and width strategy (`norm`: the leading hidden channels, the
leading KV groups and query heads, MLP neurons by |up row| x |down column|, from the weights
alone; `activation`: the importances above). `even+norm` needs no calibration and is what
`mlx_student.train --init-from` does to a base wider or deeper than `model:`. Every candidate
is scored before training on held-out text (default data/stdlib/valid.jsonl): full-vocabulary
KL to the teacher, CE and teacher top-1 agreement; the lowest KL is written to --out (an
mlx-lm folder) with prune_report.json and prune_report.md beside the weights. The target shape
keeps the ANE rules of mlx_student.config (widths multiples of 64, head_dim 64/128, ...).
"""

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tqdm import tqdm

from . import model as student_model
from .config import ConfigError, StudentConfig, load_config, load_yaml, validate
from .data import DataError
from .files import atomic_dir, write_json_atomic
from .hf_config import load as load_folder
from .hf_config import read_config
from .importance import Importance, importance
from .losses import cross_entropy, forward_kl

DEPTH = ("even", "block_importance", "drop_kl")
WIDTH = ("norm", "activation")
PRUNE_DEFAULTS = {
    "teacher": "models/smollm2-135m-instruct",
    "out": "runs/pruned",
    "calibration": "data/stdlib/train.jsonl",
    "calibration_tokens": 4096,
    "drop_kl_tokens": 1024,  # the drop-one-layer KL passes cost a forward pass per layer
    "heldout": "data/stdlib/valid.jsonl",
    "heldout_tokens": 2048,
    "seq_len": 256,
    "batch_size": 4,
    "depth": list(DEPTH),
    "width": list(WIDTH),
}
SHAPE_FLAGS = {"layers": "num_hidden_layers", "hidden": "hidden_size",
               "intermediate": "intermediate_size", "heads": "num_attention_heads",
               "kv_heads": "num_key_value_heads"}


# config.json fields of a base that our llama cannot represent: refuse rather than drop them
# (RoPE kinds and the other shapes of foreign config.json files: mlx_student/hf_config.py).
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False}


# ---------------------------------------------------------------- cuts
def base_config(folder) -> dict:
    """The `model:` fields of an mlx-lm llama folder, its tokenizer the student's default.
    Raises ConfigError naming the file when it is not a llama the student can represent."""
    path = Path(folder) / "config.json"
    try:
        raw = read_config(folder)
    except ConfigError as e:
        raise ConfigError(f"init_from: {e}") from None
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type {raw.get('model_type')!r}: only llama bases map onto "
                          "the student (mlx_lm.models.llama)")
    for key, ok in UNSUPPORTED.items():
        if raw.get(key, ok) != ok:
            raise ConfigError(f"{path}: {key} {raw[key]!r} is not supported by the student's llama")
    values = StudentConfig.from_mlx_config(raw).__dict__.copy()
    values.pop("qat")
    values.pop("judge")
    values["tokenizer"] = values["tokenizer"] or str(folder)
    if "head_dim" not in raw:
        values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    return values


@dataclass
class Cut:
    """What a student keeps of its base: base layer ids, hidden channel ids, and per kept
    layer the query heads, KV heads and MLP neurons (base ids, in base order)."""

    layers: list
    hidden: list
    q_heads: list
    kv_heads: list
    neurons: list

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self)).encode()).hexdigest()[:16]


def keep_layers(n_base: int, n: int) -> list:
    """`n` of `n_base` blocks, evenly spaced, the first and the last always kept."""
    if n > n_base:
        raise ConfigError(f"model.num_hidden_layers: {n} is more than the base's {n_base}")
    return np.round(np.linspace(0, n_base - 1, n)).astype(int).tolist() if n > 1 else [n_base - 1]


def _top(scores, n) -> list:
    """Ids of the `n` largest scores, in increasing id order (ties: the lower id)."""
    return sorted(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:n].tolist())


def check_shape(c: StudentConfig, b: StudentConfig):
    """Raise ConfigError naming the `model:` field where `c` cannot be cut from `b`."""
    problems = []
    if c.vocab_size != b.vocab_size:
        problems.append(f"model.vocab_size: {c.vocab_size} differs from the base's {b.vocab_size}")
    if c.head_dim != b.head_dim:
        problems.append(f"model.head_dim: {c.head_dim} differs from the base's {b.head_dim}")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
        if getattr(c, name) > getattr(b, name):
            problems.append(f"model.{name}: {getattr(c, name)} is more than the base's "
                            f"{getattr(b, name)}")
    group = b.num_attention_heads // b.num_key_value_heads
    per_kv = c.num_attention_heads // c.num_key_value_heads
    if per_kv > group:
        problems.append(f"model.num_attention_heads: {per_kv} query heads per KV head; the base "
                        f"has {group}")
    if problems:
        raise ConfigError("; ".join(problems))


def plan(c: StudentConfig, b: StudentConfig, depth: str, width: str, base: dict,
         imp: "Importance | None" = None) -> Cut:
    """The cut of strategy `depth`+`width` (DEPTH, WIDTH) taking student `c` out of base `b`
    (`base`: its parameter tree). Strategies other than even+norm need `imp`."""
    check_shape(c, b)
    if (depth != "even" or width != "norm") and imp is None:
        raise ValueError(f"{depth}+{width}: needs calibration importance")
    layers = {"even": lambda: keep_layers(b.num_hidden_layers, c.num_hidden_layers),
              "block_importance": lambda: _top(imp.block, c.num_hidden_layers),
              "drop_kl": lambda: _top(imp.drop_kl, c.num_hidden_layers)}[depth]()
    group = b.num_attention_heads // b.num_key_value_heads
    per_kv = c.num_attention_heads // c.num_key_value_heads
    hidden = list(range(c.hidden_size)) if width == "norm" else _top(imp.hidden, c.hidden_size)
    q_heads, kv_heads, neurons = [], [], []
    for i in layers:
        if width == "norm":
            kv = list(range(c.num_key_value_heads))
            q = [g * group + j for g in kv for j in range(per_kv)]
            mlp = base["model"]["layers"][i]["mlp"]
            score = (mx.linalg.norm(mlp["up_proj"]["weight"].astype(mx.float32), axis=1)
                     * mx.linalg.norm(mlp["down_proj"]["weight"].astype(mx.float32), axis=0))
            keep = _top(np.array(score), c.intermediate_size)
        else:
            heads = imp.heads[i].reshape(b.num_key_value_heads, group)
            kv = _top(heads.sum(axis=1), c.num_key_value_heads)
            q = [g * group + j for g in kv for j in _top(heads[g], per_kv)]
            keep = _top(imp.neurons[i], c.intermediate_size)
        q_heads.append(q)
        kv_heads.append(kv)
        neurons.append(keep)
    return Cut(layers, hidden, q_heads, kv_heads, neurons)


def _rows(heads, d):
    return mx.array(np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads]))


def apply(cut: Cut, base: dict, head_dim: int, tie_word_embeddings: bool) -> dict:
    """The student's parameter tree cut out of the base's parameter tree `base`."""
    h = mx.array(cut.hidden)
    layers = []
    for i, q, kv, n in zip(cut.layers, cut.q_heads, cut.kv_heads, cut.neurons):
        layer = base["model"]["layers"][i]
        a, m = layer["self_attn"], layer["mlp"]
        q, kv, n = _rows(q, head_dim), _rows(kv, head_dim), mx.array(n)
        layers.append({
            "self_attn": {"q_proj": {"weight": a["q_proj"]["weight"][q][:, h]},
                          "k_proj": {"weight": a["k_proj"]["weight"][kv][:, h]},
                          "v_proj": {"weight": a["v_proj"]["weight"][kv][:, h]},
                          "o_proj": {"weight": a["o_proj"]["weight"][h][:, q]}},
            "mlp": {"gate_proj": {"weight": m["gate_proj"]["weight"][n][:, h]},
                    "up_proj": {"weight": m["up_proj"]["weight"][n][:, h]},
                    "down_proj": {"weight": m["down_proj"]["weight"][h][:, n]}},
            "input_layernorm": {"weight": layer["input_layernorm"]["weight"][h]},
            "post_attention_layernorm": {"weight": layer["post_attention_layernorm"]["weight"][h]},
        })
    out = {"model": {"embed_tokens": {"weight": base["model"]["embed_tokens"]["weight"][:, h]},
                     "layers": layers, "norm": {"weight": base["model"]["norm"]["weight"][h]}}}
    if not tie_word_embeddings:
        head = base["lm_head"] if "lm_head" in base else base["model"]["embed_tokens"]
        out["lm_head"] = {"weight": head["weight"][:, h]}
    return out


def build(c: StudentConfig, cut: Cut, base: dict, dtype=None) -> llama.Model:
    """A llama.Model of config `c` holding the weights `cut` takes from `base` (cast to
    `dtype` when given)."""
    weights = tree_flatten(apply(cut, base, c.head_dim, c.tie_word_embeddings))
    model = llama.Model(student_model.model_args(c))
    model.load_weights([(k, v.astype(dtype or v.dtype)) for k, v in weights])
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------- scoring
def text_batches(path, tokenizer, tokens, seq_len, batch_size) -> list:
    """About `tokens` tokens of a text jsonl file ({"text": ...} a line) as (B, seq_len) int32
    arrays: seq_len-token chunks of documents spread evenly over the file, dealt round-robin
    (evenly spaced inside each document), so only those documents are tokenized. Raises
    DataError naming the file if it is not such a file or holds too few tokens."""
    want = max(1, -(-tokens // seq_len))
    try:
        with open(path) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: calibration and held-out text must be a jsonl of "
                        f"{{\"text\": ...}} records ({type(e).__name__}: {e})") from None
    picked = np.linspace(0, len(texts) - 1, min(want, len(texts))).round().astype(int).tolist()
    rest = [i for i in range(len(texts)) if i not in set(picked)]  # if the picked run short
    docs = []  # each tokenized document's full chunks
    for k, i in enumerate(picked + rest):
        if k >= len(picked) and sum(map(len, docs)) >= want:
            break
        ids = tokenizer.encode(texts[i])
        docs.append([ids[j * seq_len : (j + 1) * seq_len] for j in range(len(ids) // seq_len)])
    counts = [0] * len(docs)  # chunks taken per document, dealt round-robin
    while sum(counts) < want and any(c < len(d) for c, d in zip(counts, docs)):
        for j, d in enumerate(docs):
            if counts[j] < len(d) and sum(counts) < want:
                counts[j] += 1
    chunks = [d[t] for d, c in zip(docs, counts) if c
              for t in np.linspace(0, len(d) - 1, c).round().astype(int)]
    if len(chunks) < want:
        raise DataError(f"{path}: {len(chunks) * seq_len} tokens in full chunks of {seq_len}; "
                        f"{want * seq_len} needed")
    picked_chunks = np.array(chunks[:want], np.int32)
    return [picked_chunks[i : i + batch_size] for i in range(0, want, batch_size)]


def teacher_logprobs(teacher, batches) -> list:
    """The teacher's full-vocabulary log-probabilities (float32) at every position of each
    batch but the last (whose next token the batch does not hold)."""
    out = []
    for inputs in batches:
        logits = teacher(mx.array(inputs)[:, :-1]).astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(out[-1])
    return out


def score(model, batches, reference) -> dict:
    """Token means over `batches` of KL(teacher || model) (full vocabulary), CE of the next
    token and top-1 agreement with the teacher; `reference`: teacher_logprobs(batches)."""
    sums, count = {"kl": 0.0, "ce": 0.0, "top1_agree": 0.0}, 0
    for inputs, ref in zip(batches, reference):
        inputs = mx.array(inputs)
        logits = model(inputs[:, :-1]).astype(mx.float32)
        mask = mx.ones(logits.shape[:2])
        n = mask.size
        sums["kl"] += forward_kl(logits, ref, mask).item() * n
        sums["ce"] += cross_entropy(logits, inputs[:, 1:], mask).item() * n
        agree = mx.argmax(logits, axis=-1) == mx.argmax(ref, axis=-1)
        sums["top1_agree"] += agree.sum().item()
        count += n
    return {k: v / count for k, v in sums.items()}


# ---------------------------------------------------------------- the job
def target_config(args, base: dict) -> StudentConfig:
    """The student's shape: the base's fields, under `model:` of args.config, under the shape
    flags. Raises ConfigError naming the file and line, or the flag, of each problem."""
    values = dict(base, role="pilot")
    if args.config:
        values = asdict(load_config(args.config, values))
        values.pop("qat")
    flagged = {}
    for flag, name in SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            values[name] = flagged[name] = getattr(args, flag)
    config, problems = validate(values)
    if problems:
        where = {name: f"--{flag.replace('_', '-')}" for flag, name in SHAPE_FLAGS.items()}
        raise ConfigError("target shape: " + "; ".join(
            f"{where[n] + ' ' + str(flagged[n]) + ': ' if n in flagged else ''}model.{n}: {p}"
            for n, p in problems))
    return config


def markdown(report: dict) -> str:
    """prune_report.md: the candidates table (chosen marked) and the importance summary."""
    t = report["teacher_heldout"]
    drop = (f"drop-one-layer KL over {report['importance']['drop_kl_tokens']}"
            if report["importance"]["drop_kl_tokens"] else "no layer is cut: no drop-one-layer KL")
    lines = [f"# Prune report: {report['out']}", "",
             f"Teacher `{report['teacher']}` ({report['base']['num_hidden_layers']} layers, hidden "
             f"{report['base']['hidden_size']}, MLP {report['base']['intermediate_size']}, "
             f"{report['base']['num_attention_heads']}/{report['base']['num_key_value_heads']} "
             f"heads) -> student {report['target']['num_hidden_layers']} layers, hidden "
             f"{report['target']['hidden_size']}, MLP {report['target']['intermediate_size']}, "
             f"{report['target']['num_attention_heads']}/{report['target']['num_key_value_heads']}"
             f" heads ({report['parameters']['student']:,} of "
             f"{report['parameters']['teacher']:,} parameters).", "",
             f"Importance from {report['importance']['tokens']} calibration tokens of "
             f"`{report['calibration']}` ({drop}); candidates scored before any training on "
             f"{report['heldout_tokens']} tokens of `{report['heldout']}`, where the teacher's CE "
             f"is {t['ce']:.3f}.", "",
             "| candidate | KL to teacher | CE | top-1 agreement | layers kept | chosen |",
             "|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        names = " = ".join([c["name"], *c["same_as"]])
        n = report["base"]["num_hidden_layers"]
        kept = f"all {n}" if c["layers"] == list(range(n)) else f"{len(c['layers'])}: {c['layers']}"
        lines.append(f"| {names} | {c['kl']:.4f} | {c['ce']:.3f} | {100 * c['top1_agree']:.1f} % |"
                     f" {kept} | {'**chosen**' if c['chosen'] else ''} |")
    imp = report["importance"]
    if imp.get("block"):
        order = lambda xs: np.argsort(xs).tolist()  # noqa: E731
        lines += ["", "Layers from least to most important: block importance "
                  f"{order(imp['block'])}" + (f"; drop-one-layer KL {order(imp['drop_kl'])}"
                                              if imp["drop_kl"] else "") + "."]
    lines += ["", f"Chosen: **{report['chosen']}** (the lowest KL), written to `{report['out']}`."]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    """Score every candidate cut and write the best; returns the report (also in --out)."""

    from mlx_lm.utils import load_tokenizer

    from .teacher import default as default_teacher

    unknown = [x for x in (*args.depth, *args.width) if x not in (*DEPTH, *WIDTH)]
    if unknown or not args.depth or not args.width:
        raise ConfigError(f"--depth / --width: unknown strategies {unknown}; depth: {DEPTH}, "
                          f"width: {WIDTH}")
    teacher_dir = Path(args.teacher)
    if teacher_dir == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare(teacher_dir)
    base_values = base_config(teacher_dir)
    b, c = StudentConfig(**base_values), target_config(args, base_values)
    check_shape(c, b)
    teacher, _ = load_folder(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    base = teacher.parameters()
    candidates = [(d, w) for w in args.width for d in args.depth]
    imp = None
    if any(x != ("even", "norm") for x in candidates):
        calib = text_batches(args.calibration, tokenizer, args.calibration_tokens, args.seq_len,
                             args.batch_size)
        needs_kl = c.num_hidden_layers < b.num_hidden_layers and "drop_kl" in args.depth
        imp = importance(teacher, calib, args.drop_kl_tokens if needs_kl else 0)
    heldout = text_batches(args.heldout, tokenizer, args.heldout_tokens, args.seq_len,
                           args.batch_size)
    reference = teacher_logprobs(teacher, heldout)
    rows, seen = [], {}
    for depth, width in tqdm(candidates, desc="candidates", unit="cut"):
        cut = plan(c, b, depth, width, base, imp)
        name = f"{depth}+{width}"
        if cut.key() in seen:  # e.g. every depth strategy when all layers are kept
            seen[cut.key()]["same_as"].append(name)
            continue
        tic = time.perf_counter()
        student = build(c, cut, base)
        row = {"name": name, "depth": depth, "width": width, "same_as": [],
               **score(student, heldout, reference), "layers": cut.layers,
               "seconds": round(time.perf_counter() - tic, 1), "cut": cut}
        print(f"[prune] {name}: KL {row['kl']:.4f}, CE {row['ce']:.3f}, top-1 "
              f"{100 * row['top1_agree']:.1f} %", flush=True)
        rows.append(row)
        seen[cut.key()] = row
        del student
    best = min(rows, key=lambda r: r["kl"])
    student = build(c, best["cut"], base)
    teacher_row = score(teacher, heldout, reference)
    report = {
        "teacher": str(teacher_dir), "out": str(args.out), "base": asdict(b), "target": asdict(c),
        "parameters": {"teacher": student_model.num_parameters(teacher),
                       "student": student_model.num_parameters(student)},
        "calibration": str(args.calibration), "heldout": str(args.heldout),
        "heldout_tokens": sum(x[:, 1:].size for x in heldout), "seq_len": args.seq_len,
        "teacher_heldout": {"ce": teacher_row["ce"]},
        "importance": {"tokens": imp.tokens, "drop_kl_tokens": imp.drop_kl_tokens,
                       "block": imp.block.tolist(), "drop_kl": imp.drop_kl.tolist()
                       if imp.drop_kl_tokens else []} if imp else {"tokens": 0, "drop_kl_tokens": 0},
        "candidates": [{**{k: v for k, v in r.items() if k != "cut"}, "chosen": r is best}
                       for r in rows],
        "chosen": best["name"], "cut": asdict(best["cut"]),
    }
    with atomic_dir(Path(args.out)) as tmp:
        student_model.save(tmp, student, c, tokenizer)
        write_json_atomic(tmp / "prune_report.json", report)
        (tmp / "prune_report.md").write_text(markdown(report))
    print(f"[prune] chosen {best['name']} (KL {best['kl']:.4f}); wrote {args.out} with "
          "prune_report.json and prune_report.md")
    return report


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.prune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + f"\ndefaults: {json.dumps(PRUNE_DEFAULTS)}")
    add = p.add_argument
    add("--config", help="YAML whose `model:` gives the student's shape (fields it leaves out "
        "are the teacher's) and whose optional `prune:` block holds these settings")
    add("--teacher", help="the mlx-lm llama folder to cut from")
    add("--out", help="the student's mlx-lm folder, with prune_report.json / .md")
    for flag, name in SHAPE_FLAGS.items():
        add(f"--{flag.replace('_', '-')}", type=int, help=f"model.{name} of the student")
    add("--calibration", help="text jsonl whose forward passes give the importances")
    add("--calibration-tokens", type=int, help="calibration tokens (spread over the file)")
    add("--drop-kl-tokens", type=int, help="tokens of the drop-one-layer KL passes")
    add("--heldout", help="text jsonl the candidates are scored on")
    add("--heldout-tokens", type=int, help="held-out tokens")
    add("--seq-len", type=int, help="tokens per sequence")
    add("--batch-size", type=int, help="sequences per forward pass")
    add("--depth", nargs="+", help=f"depth strategies to try: {', '.join(DEPTH)}")
    add("--width", nargs="+", help=f"width strategies to try: {', '.join(WIDTH)}")
    return p


def parse_args(argv=None):
    """Flags over the config's `prune:` block over PRUNE_DEFAULTS."""
    args = build_parser().parse_args(argv)
    block, lines = {}, {}
    if args.config:
        data, lines = load_yaml(args.config)
        block = data.get("prune") or {}
    unknown = [k for k in block if k not in PRUNE_DEFAULTS]
    if unknown:
        raise ConfigError("\n".join(f"{args.config}:{lines.get(f'prune.{k}', '?')}: prune.{k}: "
                                    "unknown prune setting" for k in unknown))
    for key, value in {**PRUNE_DEFAULTS, **block}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
