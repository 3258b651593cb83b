"""Study of KD from a teacher with another tokenizer (issue 15, item 4).

    python scripts/study_xtok.py [--bpe models/stdlib-bpe-8k] [--steps 150] [--out runs/study_xtok]

The default teacher (SmolLM2-135M-Instruct, vocab 49,152) scores stdlib-corpus text by
teacher forcing (mlx_student.score: exact top-k per token, its own tokens). A student with the
byte-level BPE of the same corpus (scripts/make_tokenizer.py, vocab 8192) is trained from one
random init, on the same records, steps and seed, three ways through mlx_student.train:

  ce      CE on the text only (sequence-level KD: what is left without logits)
  topk    CE + top-k KD, the teacher's top-k mapped onto the student's tokens at byte-aligned
          positions (kd_mode cross_tokenizer_topk)
  uld     CE + ULD (arXiv 2402.12030) at the same aligned positions (kd_mode uld)

Held-out text (test.jsonl, which neither scoring nor training saw) is cut into chunks of whole
characters; each chunk, after an eos, is scored by every model: bits per byte (the tokenizers
differ, so per-token CE is not comparable), with a bootstrap 95 % interval over chunks, and
the teacher's own for reference. Also the fraction of aligned positions (kd.json, read back
from the converted records). Writes <out>/study.json and <out>/study.md.
"""

import argparse
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx on Linux)
import mlx.core as mx
import mlx_lm
import numpy as np
import yaml

from mlx_student import train
from mlx_student.bpe import train_byte_bpe
from mlx_student.files import write_json_atomic
from mlx_student.teacher import default as default_teacher
from mlx_student.teacher import score

ARMS = {"ce": {"ce": 1.0}, "topk": {"ce": 1.0, "topk_kd": 1.0}, "uld": {"ce": 1.0, "uld": 1.0}}
STUDENT = {"role": "test", "contexts": [256], "prefill_lengths": [32], "hidden_size": 256,
           "num_hidden_layers": 4, "intermediate_size": 768, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "rope_theta": 100000.0,
           "rms_norm_eps": 1.0e-5, "tie_word_embeddings": True}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bpe", default="models/stdlib-bpe-8k", help="student tokenizer folder "
                   "(trained here from --data if missing)")
    p.add_argument("--data", default="data/stdlib", help="text folder: train.jsonl, test.jsonl")
    p.add_argument("--out", default="runs/study_xtok")
    p.add_argument("--teacher-tokens", type=int, default=30000, help="train tokens the teacher scores")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--held-out-chunks", type=int, default=200, help="held-out chunks of --chunk-chars")
    p.add_argument("--chunk-chars", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    return p.parse_args()


def held_out_chunks(path, n, chars):
    """The first `n` chunks of `chars` characters (whole lines where possible) of the file's texts."""
    out = []
    with open(path) as f:
        for line in f:
            text = json.loads(line)["text"]
            for i in range(0, len(text) - chars // 2, chars):
                out.append(text[i : i + chars])
                if len(out) == n:
                    return out
    return out


def nll_per_chunk(model, tokenizer, chunks, batch=8):
    """Summed next-token NLL (nats) of each chunk's tokens after an eos: every byte is predicted."""
    eos = tokenizer.eos_token_id
    seqs = [[eos] + tokenizer.encode(c, add_special_tokens=False) for c in chunks]
    out = []
    for i in range(0, len(seqs), batch):
        rows = seqs[i : i + batch]
        width = max(map(len, rows)) - 1
        x = np.zeros((len(rows), width), np.int32)
        y = np.zeros_like(x)
        m = np.zeros(x.shape, np.float32)
        for r, s in enumerate(rows):
            x[r, : len(s) - 1], y[r, : len(s) - 1], m[r, : len(s) - 1] = s[:-1], s[1:], 1
        logits = model(mx.array(x)).astype(mx.float32)
        nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, mx.array(y)[..., None], -1)[..., 0]
        out += (np.array(nll) * m).sum(axis=1).tolist()
    return np.array(out)


def bits_per_byte(nll, nbytes, control=None, resamples=2000, seed=0):
    """Bits per byte over all chunks with a bootstrap 95 % interval (chunks resampled), and
    with `control` (the control arm's NLL per chunk) the paired difference and its interval."""
    idx = np.random.default_rng(seed).integers(0, len(nll), (resamples, len(nll)))

    def bpb(x, i=slice(None)):
        return x[i].sum(-1) / nbytes[i].sum(-1) / math.log(2)

    out = {"bpb": float(bpb(nll)), "ci95": np.percentile(bpb(nll, idx), [2.5, 97.5]).tolist()}
    if control is not None:
        out["minus_ce"] = float(bpb(nll) - bpb(control))
        out["minus_ce_ci95"] = np.percentile(bpb(nll, idx) - bpb(control, idx), [2.5, 97.5]).tolist()
    return out


def main():
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    bpe = train_byte_bpe(Path(a.data) / "train.jsonl", a.bpe, 8192)
    default_teacher.prepare()
    scored, text = out / "scored", out / "text"  # train text, and a little of valid for the runs
    if not (scored / "manifest.json").is_file():
        text.mkdir(exist_ok=True)
        shutil.copyfile(Path(a.data) / "train.jsonl", text / "train.jsonl")
        with open(Path(a.data) / "valid.jsonl") as f:  # the runs' own validation: ~4k tokens
            docs = [{"text": json.loads(line)["text"][:2000]} for line in itertools.islice(f, 8)]
        (text / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        score.run(score.parse_args(["--data", str(text), "--out", str(scored), "--top-k", str(a.top_k),
                                    "--samples", "0", "--max-seq-length", "128", "--max-tokens",
                                    str(a.teacher_tokens), "--seed", str(a.seed)]))
    config = out / "student.yaml"
    config.write_text(yaml.safe_dump({"model": {**STUDENT, "tokenizer": str(Path(bpe).resolve())}}))
    chunks = held_out_chunks(Path(a.data) / "test.jsonl", a.held_out_chunks, a.chunk_chars)
    nbytes = np.array([len(c.encode()) for c in chunks], np.float64)
    teacher, t_tok = mlx_lm.load(str(default_teacher.DEFAULT_TEACHER_DIR))
    results = {"teacher": bits_per_byte(nll_per_chunk(teacher, t_tok, chunks), nbytes)}
    del teacher
    runs, nll = {}, {}
    for arm in a.arms:
        run_dir = out / arm
        train.run(train.parse_args([
            "--config", str(config), "--data", str(scored), "--out", str(run_dir), "--seed",
            str(a.seed), "--iters", str(a.steps), "--batch-size", str(a.batch), "--max-seq-length",
            "256", "--learning-rate", str(a.lr), "--warmup", str(max(a.steps // 10, 1)),
            "--steps-per-eval", str(a.steps), "--steps-per-save", str(a.steps), "--loss",
            ",".join(f"{k}={v}" for k, v in ARMS[arm].items())]))
        model, s_tok = mlx_lm.load(str(run_dir))
        nll[arm] = nll_per_chunk(model, s_tok, chunks)
        results[arm] = bits_per_byte(nll[arm], nbytes, nll.get("ce") if arm != "ce" else None)
        runs[arm] = json.loads((run_dir / "kd.json").read_text())
        results[arm]["kd_mode"] = runs[arm]["kd_mode"]
    splits = next(iter(runs.values()))["splits"]
    study = {"settings": vars(a), "held_out": {"chunks": len(chunks), "bytes": int(nbytes.sum())},
             "alignment": splits, "results": results,
             "elapsed_s": round(time.perf_counter() - tic, 1)}
    write_json_atomic(out / "study.json", study)
    lines = ["| arm | kd_mode | held-out bits/byte | 95 % interval | minus ce (paired 95 %) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        delta = (f"{r['minus_ce']:+.4f} ({r['minus_ce_ci95'][0]:+.4f} .. {r['minus_ce_ci95'][1]:+.4f})"
                 if "minus_ce" in r else "")
        lines.append(f"| {name} | {r.get('kd_mode', '(teacher)')} | {r['bpb']:.4f} | "
                     f"{r['ci95'][0]:.4f} - {r['ci95'][1]:.4f} | {delta} |")
    tr = splits["train"]
    lines.append(f"\naligned positions (train): {tr['aligned']}/{tr['target_positions']} = "
                 f"{tr['aligned_fraction']:.1%}; first-token agreement "
                 f"{tr['first_token_agreement']:.1%}; mass lost to the tail {tr['lost_mass_mean']:.2e}")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
