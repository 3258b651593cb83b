"""Train a student on a data folder with a configured mix of CE and KD losses.

    mlx_student.train --config configs/pilot.yaml [--iters 100] [--resume] ...
    mlx.launch -n 2 --backend ring -m mlx_student.train --config ...   # data parallel

The config file holds the model (`model:`) and run settings (the keys of CONFIG_DEFAULTS);
command-line flags override the file, the file overrides the defaults, as in mlx_lm.lora.
The run writes runs/<name>/ (an mlx-lm model folder with metrics.jsonl and loss.png) and
runs/<name>.trainer/ (what --resume needs) every --steps-per-save steps and at the end.

`qat: {bits: 8, group_size: 32, embeddings: false, start_step: 160}` (or --qat
bits=8,start_step=160) makes the steps after start_step quantization-aware (mlx_student.quant):
from then on runs/<name>/ holds the fake-quantized weights, exactly on the int8 (or 4-bit)
grid, and its config.json records `student.qat`, from which the exporter picks its
compression, plus qat_scales.safetensors (the scales it takes); runs/<name>.trainer/ keeps the
fp32 masters. More keys: `scales: lsq` (learned scales), `activations: 8` with `observer:
minmax|ema` (W8A8 / W4A8 studies); see mlx_student/quant.py. QAT from a finished fp model:
`--init-from runs/fp --teacher runs/fp --loss forward_kl=1 --qat bits=4,scales=lsq`
(self-distillation: the fp model's logits are the target).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.utils import print_trainable_parameters
from mlx_lm.utils import load_tokenizer
import yaml
from tqdm import tqdm

from . import checkpoint, finetune, hf_config, prune, run_settings, xtok
from . import model as student_model
from .config import ConfigError, apply_config, load_config
from .data import DataError, load_dataset
from .files import OutputExistsError, claim_dir, write_json_atomic
from .losses import LOSSES, TAILS
from .onpolicy import on_policy_settings
from .quant import qat_settings
from .records import SPAN_TYPES, process_weights
from .teacher import default as default_teacher
from .trainer import DTYPES, TrainingArgs, schedule, train

CONFIG_DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(TrainingArgs) if f.name != "loss"},
    "loss": {"ce": 1.0},
    "data": "data/stdlib",
    "out": "runs/student",
    "resume": False,
    "learning_rate": 1e-3,
    "warmup": 20,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "skip_bad_lines": False,
    "process_weights": None,  # {tool_name, arguments, integration}: weights of process spans
    "teacher": None,  # an mlx-lm folder in this process: its logits for forward_kl/reverse_kl/jsd
    "teacher_tokenizer": None,  # the KD records' tokenizer folder when not the student's (xtok)
    "init_from": None,  # an mlx-lm llama folder the student starts from (mlx_student.finetune)
    "fine_tune_type": "full",  # full | lora | dora
    "num_layers": -1,  # blocks (the last N) that get adapters; -1: all
    "lora_parameters": dict(finetune.LORA_DEFAULTS),  # {rank, scale, dropout, keys}
    "quantize_base": None,  # QLoRA: {bits: 4, group_size: 64}
    "optimizer": "adamw",  # adamw | adafactor | sgd (mlx_student.plan counts their memory)
}


OPTIMIZERS = {
    "adamw": lambda lr, wd: optim.AdamW(learning_rate=lr, weight_decay=wd),
    "adafactor": lambda lr, wd: optim.Adafactor(learning_rate=lr, weight_decay=wd, relative_step=False,
                                                scale_parameter=False),
    "sgd": lambda lr, wd: optim.SGD(learning_rate=lr, weight_decay=wd),
}


def loss_weights(text):
    """'ce=0.5,topk_kd=0.5' -> {'ce': 0.5, 'topk_kd': 0.5}"""
    try:
        weights = {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=weight,... got {text!r}") from None
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown loss {sorted(unknown)}; known: {list(LOSSES)}")
    return weights


def process_weights_flag(text):
    """'tool_name=2,arguments=2' -> {'tool_name': 2.0, 'arguments': 2.0} (checked in run)."""
    try:
        return {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected type=weight,... got {text!r}") from None


def qat_flag(text):
    """'bits=4,group_size=32,start_step=160' -> the qat mapping (checked in run)."""
    try:
        pairs = dict(p.split("=") for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected key=value,... got {text!r}") from None
    return {k.strip(): yaml_scalar(v) for k, v in pairs.items()}


def yaml_scalar(text):
    """'8' -> 8, '0.9' -> 0.9, 'true' -> True, 'lsq' -> 'lsq': as the YAML file would read it."""
    return yaml.safe_load(text.strip())


def build_parser():
    p = argparse.ArgumentParser(
        description="Train an MLX student (mlx-lm llama) with CE and KD losses. Flags override "
        "the config file's run settings, which override the defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}",
    )
    add = p.add_argument
    add("--config", required=True, help="YAML with `model:` and run settings")
    add("--data", help="folder with train.jsonl (valid.jsonl, test.jsonl optional)")
    add("--out", help="run folder: the mlx-lm model; trainer state goes to <out>.trainer")
    add("--resume", action="store_true", default=None, help="continue from <out>.trainer")
    add("--seed", type=int, help="init, data order and RNG seed")
    add("--iters", type=int, help="optimizer steps in total (a resumed run counts from 0)")
    add("--batch-size", type=int, help="global sequences per optimizer step (all ranks)")
    add("--grad-accumulation-steps", type=int, help="micro-batches per optimizer step")
    add("--max-seq-length", type=int, help="tokens per sequence")
    add("--learning-rate", type=float, help="peak learning rate (AdamW)")
    add("--warmup", type=int, help="linear warmup steps before the cosine decay")
    add("--min-lr-ratio", type=float, help="final learning rate as a fraction of the peak")
    add("--weight-decay", type=float, help="AdamW weight decay")
    add("--optimizer", choices=list(OPTIMIZERS), help="adamw (two fp32 moments), adafactor (factored "
        "second moment, the scheduled learning rate) or sgd (no state)")
    add("--grad-clip", type=float, help="clip the global gradient norm to this")
    add("--grad-checkpoint", action="store_true", default=None, help="recompute layer activations in backward (less memory)")
    add("--compute-dtype", choices=list(DTYPES), help="forward/backward dtype; master weights stay fp32")
    add("--loss", type=loss_weights, help="loss mix, e.g. ce=0.5,topk_kd=0.5")
    add("--temperature", type=float, help="KD temperature (T^2-scaled)")
    add("--jsd-beta", type=float, help="beta of the generalized JSD")
    add("--topk-tail", choices=TAILS, help="top-k KD tail mode")
    add("--counted-positions", action=argparse.BooleanOptionalAction, default=None,
        help="compute the LM head, softmax and teacher logits only where a loss term counts "
        "(default; the same losses and gradients, faster on prompt-heavy records)")
    add("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
        help="batch records of like lengths together (default, as mlx-lm: little padding); "
        "--no-group-by-length shuffles records into batches (as Hugging Face's Trainer), so "
        "short completions and long text windows share every step")
    add("--process-weights", type=process_weights_flag,
        help=f"loss weights of the process spans of tool traces ({', '.join(SPAN_TYPES)}), "
        "e.g. tool_name=2,arguments=2,integration=1.5; unset types weigh 1")
    add("--qat", type=qat_flag, help="QAT after a step: bits=8,start_step=160 (group_size, embeddings, scales=lsq, activations=8, observer, observer_batches, ema_decay)")
    add("--on-policy", type=qat_flag, help="GKD: lmbda=0.5,temperature=1,max_new_tokens=64: that "
        "fraction of each batch's completions sampled by the student, scored by --teacher "
        "(dense KD terms only)")
    add("--teacher", help="mlx-lm folder whose logits the dense KD losses distil (same vocab), "
        "e.g. the fp model for QAT by self-distillation")
    add("--teacher-tokenizer", help="tokenizer folder the KD records' token ids belong to, when "
        "not the student's (default: the data folder's manifest.json); their top-k / sampled "
        "targets are mapped onto the student's tokens (mlx_student.xtok)")
    add("--init-from", help="mlx-lm llama folder to start from (layers/widths cut to `model:`)")
    add("--fine-tune-type", choices=finetune.FINE_TUNE_TYPES, help="full, or mlx-lm's LoRA / DoRA adapters")
    add("--num-layers", type=int, help="adapters on the last N blocks (-1: all)")
    add("--quantize-base", type=qat_flag, help="QLoRA base: bits=4,group_size=64")
    add("--steps-per-report", type=int, help="progress-bar refresh interval")
    add("--steps-per-eval", type=int, help="validate every N steps")
    add("--val-batches", type=int, help="validation batches, -1 for all")
    add("--steps-per-save", type=int, help="checkpoint every N steps")
    add("--skip-bad-lines", action="store_true", default=None, help="skip malformed data lines (counted) instead of failing")
    return p


def parse_args(argv=None):
    """Command line over the config file's run settings over CONFIG_DEFAULTS."""
    args = build_parser().parse_args(argv)
    args.flags_given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    _, args.setting_lines = apply_config(args, CONFIG_DEFAULTS, skip=("model", "pilot", "judge"),
                                         what="run setting")
    return args


def plot_losses(history, path):
    """loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train")
    valid = [h for h in history if "valid" in h]
    if valid:
        key = "ce" if "ce" in valid[0]["valid"] else next(iter(valid[0]["valid"]))
        ax.plot([h["step"] for h in valid], [h["valid"][key] for h in valid], "o-", label=f"valid {key}")
    ax.set(xlabel="step", ylabel="loss", title=path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def check(args) -> tuple:
    """The run's settings, all checked before anything runs (mlx_student.run_settings): the
    model config, then every run setting, listed together. Returns (StudentConfig, the
    process spans' weights). Raises ConfigError."""
    config = load_config(args.config, prune.base_config(args.init_from) if args.init_from else None)
    found = run_settings.train_problems(args, {"optimizer": list(OPTIMIZERS),
                                               "compute_dtype": list(DTYPES)})
    weights = {}  # the process spans' weights, every type
    checks = [(None, lambda: setattr(args, "qat", qat_settings(args.qat))),
              (None, lambda: weights.update(process_weights(args.process_weights))),
              (None, lambda: setattr(args, "on_policy", on_policy_settings(
                  args.on_policy, args.loss, args.teacher)))]
    if not any(k == "num_layers" for k, _ in found):  # it compares num_layers with the model
        checks.append((None, lambda: finetune.check_settings(args, config)))
    if args.teacher:  # its folder read now, not after the data and the student
        checks.append(("teacher", lambda: hf_config.read_config(args.teacher)))
    for key, check in checks:
        try:
            check()
        except ValueError as e:  # messages 'key: problem'; a ConfigError for the teacher
            found.append((key, str(e)) if key else run_settings.from_error(e))
    run_settings.raise_problems(found, args.config, args.setting_lines, args.flags_given)
    widths = (config.hidden_size, config.intermediate_size,
              config.num_attention_heads * config.head_dim)  # the linears' input widths
    if args.qat and args.qat["bits"] == 4 and any(w % args.qat["group_size"] for w in widths):
        raise ConfigError(f"{args.config}: qat.group_size {args.qat['group_size']} does not divide "
                          f"the input widths {widths}")
    if config.tokenizer is None:
        raise ConfigError(f"{args.config}: model.tokenizer: a tokenizer folder is needed to train")
    return config, weights


def run(args):
    config, weights = check(args)
    if Path(config.tokenizer) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    tokenizer = load_tokenizer(Path(config.tokenizer))
    with tempfile.TemporaryDirectory(prefix="xtok-") as tmp:
        data, kd_report = xtok.prepare(args.data, tokenizer, args.loss, tmp, args.teacher_tokenizer,
                                       args.teacher)
        try:
            splits = load_dataset(data, tokenizer, config.vocab_size, args.max_seq_length,
                                  args.skip_bad_lines, weights)
        except DataError as e:  # converted records: name the file they came from
            raise DataError(str(e).replace(str(data), str(args.data))) from None
    for split in splits.values():
        split.path = Path(args.data) / split.path.name
    run_settings.raise_problems(run_settings.check_data(splits, args.batch_size), args.config,
                                args.setting_lines, args.flags_given)
    targs = TrainingArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArgs)})
    rank = mx.distributed.init().rank()

    mx.random.seed(args.seed)
    model = finetune.build_student(config, args)
    sched = schedule(args.learning_rate, args.iters, args.warmup, args.min_lr_ratio)
    optimizer = OPTIMIZERS[args.optimizer](sched, args.weight_decay)
    out = Path(args.out)
    metrics = out / "metrics.jsonl"
    start = 0
    if args.resume:
        start = checkpoint.load(out, model, optimizer, config)["step"]
    if rank == 0:
        claim_dir(out)
        write_json_atomic(out / "kd.json", kd_report)
        print(f"kd_mode {kd_report['kd_mode']}" + "".join(
            f"; {name}: {c['aligned']}/{c['target_positions']} target positions aligned"
            for name, c in kd_report.get("splits", {}).items()))
        kept = metrics.read_text().splitlines() if start and metrics.exists() else []
        kept = [line for line in kept if json.loads(line)["step"] <= start]
        metrics.write_text("".join(line + "\n" for line in kept))
        print(
            f"{config.role} student: {student_model.num_parameters(model):,} parameters; "
            f"{len(splits['train'].examples)} train sequences from {args.data}"
            + (f"; resuming at step {start}" if start else "")
        )
        if args.fine_tune_type != "full":
            print_trainable_parameters(model)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("resume", "flags_given", "setting_lines")}
    bar = tqdm(total=args.iters, initial=start, desc="train", unit="step", disable=rank != 0)

    def on_report(record):
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if "valid" in record:
            bar.write(f"step {record['step']}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in record["valid"].items()))

    def on_save(step):
        qat = targs.qat if targs.qat and step > targs.qat["start_step"] else None
        checkpoint.save(out, model, config, tokenizer, optimizer, step, settings, qat)

    valid = splits["valid"].examples if "valid" in splits else None
    teacher = hf_config.load(args.teacher)[0] if args.teacher else None
    history = train(model, optimizer, splits["train"].examples, valid, targs, start, on_report,
                    on_save, teacher, tokenizer.eos_token_ids)
    bar.close()
    if rank == 0:
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        if records:
            plot_losses(records, out / "loss.png")
        print(f"saved {out} (mlx-lm folder, metrics.jsonl, loss.png); resume state {checkpoint.trainer_dir(out)}")
    return history


def interrupted(out) -> str:
    """What a Ctrl-C leaves: the last whole checkpoint (checkpoint.py writes each atomically)."""
    state = checkpoint.trainer_dir(out) / "state.json"
    if out is None or not state.is_file():
        return "interrupted: no checkpoint was saved; nothing to resume"
    step = json.loads(state.read_text())["step"]
    return (f"interrupted: {out} holds the checkpoint of step {step}; rerun the command with "
            "--resume to continue from it")


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        run(args)
    except (FileExistsError, NotADirectoryError) as e:  # --out (or a folder above it) is a file
        where = "" if str(e.filename) == str(args.out) else f"{e.filename} "
        print(f"error: {e}" if isinstance(e, OutputExistsError) else
              f"error: --out {args.out}: {where}is a file, not a folder", file=sys.stderr)
        sys.exit(2)
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass  # leaving the block frees the run's frames: its progress bar is drawn before the line
    else:
        return
    print(interrupted(args and args.out), file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    main()
