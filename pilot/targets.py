"""The pilot's training data: natural text scored by the teacher beside its completions.

Most KD tokens come from text that already exists, scored by the teacher in one forward pass
a window (mlx_student.score: teacher forcing, exact top-k and/or sampled ids); a few come from
completions the teacher generates (mlx_student.kd_mix). Two stages:

* `score`: documents are drawn in a seeded order from each source (a folder of text files, e.g.
  the Python docs' library/ reST sources, or a `{"text": ...}` jsonl) until that source's token
  budget is met, split into train / valid, written as a text folder (runs/<name>/natural/) and
  scored by the teacher (data/scored_<name>/). Every source must be disjoint from the files the
  evaluation reads, by path and by content (a document's text equal to a held-out document's is
  refused too): the held-out text stays unseen by every stage.
* `train_data`: the arms' data folder (data/train_<name>/): the scored windows and the teacher's
  completions, each split concatenated, with a manifest of the records and target tokens of
  each source read back from the written files.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from mlx_student.config import ConfigError
from mlx_student.data import SPLITS
from mlx_student.files import atomic_dir, write_json_atomic

from .paths import kd_dir, scored_dir, train_data_dir
from .stage import Pilot, StageError, flags


def documents(source) -> list:
    """[(name, text)] of a source: every *.txt file under a folder (sorted, names relative to
    it) or every record of a `{"text": ...}` jsonl file (names `<file>:<line>`)."""
    path = Path(source)
    if path.is_dir():
        return [(str(f.relative_to(path)), f.read_text(encoding="utf-8", errors="replace"))
                for f in sorted(path.rglob("*.txt"))]
    if path.is_file():
        with open(path) as f:
            return [(f"{path.name}:{i}", json.loads(line)["text"])
                    for i, line in enumerate(f, 1) if line.strip()]
    raise FileNotFoundError(f"{source}: no such folder or file (a pilot.score source)")


def _files(path) -> set:
    path = Path(path)
    if path.is_dir():
        return {f.resolve() for f in path.rglob("*") if f.is_file()}
    return {path.resolve()} if path.exists() else set()


def _digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()


def eval_paths(s: dict) -> list:
    """Every file or folder the evaluation reads (pilot/heldout.py via stage_eval)."""
    e = s["eval"]
    return [*e["heldout"], e["heldout_fallback"], e["next_line"]["file"]]


def check_disjoint(sources, held_out) -> None:
    """Raise ConfigError if a source shares a file with, lies inside or contains, or holds a
    document whose text equals one of, the evaluation's files `held_out`."""
    unseen = set().union(*(_files(p) for p in held_out))
    texts = {}
    for p in held_out:
        if Path(p).exists():
            texts.update({_digest(t): f"{p} ({n})" for n, t in documents(p)})
    for src in sources:
        shared = sorted(_files(src) & unseen)
        if shared:
            raise ConfigError(f"pilot.score.sources: {src} shares {len(shared)} file(s) with "
                              f"the held-out evaluation (first: {shared[0]}); the score "
                              "stage must not see text the eval reads")
        for name, text in documents(src):
            if _digest(text) in texts:
                raise ConfigError(f"pilot.score.sources: {src} ({name}) holds the same text "
                                  f"as the held-out {texts[_digest(text)]}")


def passages(docs, chars) -> list:
    """[(name#i, text)]: each document cut at blank lines into passages of about `chars`
    characters (a paragraph longer than that stays whole), so that a token budget draws from
    many documents instead of a few long ones."""
    out = []
    for name, text in docs:
        parts, cur = [], ""
        for para in text.split("\n\n"):
            if cur and len(cur) + len(para) > chars:
                parts.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        parts.append(cur)
        out += [(f"{name}#{i}", p) for i, p in enumerate(parts) if p.strip()]
    return out


def natural_text(sources, tokenizer, valid_tokens, seed, out, chars=4000) -> dict:
    """Write out/{train,valid}.jsonl ({"text": ...} a passage) from `sources`
    ([{"path", "tokens"}]): each source's passages (`passages`, about `chars` characters) in
    a seeded order, taken until its `tokens` are met (counted with `tokenizer`), the first
    ones (up to its share of `valid_tokens`) into valid. Returns {path: {split: {passages,
    tokens, names}}}."""
    total = sum(src["tokens"] for src in sources)
    summary, lines = {}, {"train": [], "valid": []}
    for k, src in enumerate(sources):
        docs = passages(documents(src["path"]), chars)
        want = {"valid": round(valid_tokens * src["tokens"] / total), "train": src["tokens"]}
        got = {sp: {"passages": 0, "tokens": 0, "names": []} for sp in want}
        split = "valid"
        for i in np.random.default_rng([seed, k]).permutation(len(docs)):
            name, text = docs[i]
            if got[split]["tokens"] >= want[split]:
                if split == "train":
                    break
                split = "train"
            n = len(tokenizer.encode(text))
            g = got[split]
            g["passages"], g["tokens"] = g["passages"] + 1, g["tokens"] + n
            g["names"].append(name)
            lines[split].append(json.dumps({"text": text}, ensure_ascii=False))
        if got["train"]["tokens"] < src["tokens"]:
            raise ConfigError(f"pilot.score.sources: {src['path']} holds "
                              f"{got['train']['tokens']} train tokens, {src['tokens']} asked")
        summary[str(src["path"])] = got
    with atomic_dir(out) as tmp:
        for split, rows in lines.items():
            if rows:  # no valid split when valid_tokens is 0
                (tmp / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
        write_json_atomic(tmp / "sources.json", summary)
    return summary


def score_argv(s: dict) -> list:
    """mlx_student.score's command line: the natural text folder scored by the teacher."""
    opts = {k: v for k, v in s["score"].items() if k not in ("sources", "valid_tokens",
                                                              "passage_chars")}
    return ["--model", str(s["teacher"]), "--data", str(natural_dir(s)), "--out",
            str(scored_dir(s)), *flags(opts)]


def natural_dir(s: dict) -> Path:
    return Path("runs") / s["name"] / "natural"


def stage_score(p: Pilot):
    """Natural text drawn from pilot.score.sources (disjoint from the eval's files), scored by
    the teacher: data/scored_<name>/."""
    from mlx_lm.utils import load_tokenizer

    from mlx_student.teacher import score

    sc, out = p.s["score"], scored_dir(p.s)
    argv = score_argv(p.s)

    def run():
        check_disjoint([src["path"] for src in sc["sources"]], eval_paths(p.s))
        tokenizer = load_tokenizer(Path(p.s["teacher"]))
        natural_text(sc["sources"], tokenizer, sc["valid_tokens"], sc["seed"], natural_dir(p.s),
                     sc["passage_chars"])
        manifest = score.run(score.parse_args(argv))
        return {split: {k: c[k] for k in ("records", "tokens")}
                for split, c in manifest["splits"].items()}

    settings = {"argv": argv, "sources": sc["sources"], "valid_tokens": sc["valid_tokens"],
                "passage_chars": sc["passage_chars"], "eval": eval_paths(p.s)}
    inputs = [p.s["teacher"] + "/model.safetensors", *(src["path"] for src in sc["sources"])]
    return p.stage("score", settings, inputs, [out / "manifest.json", natural_dir(p.s)], run)


def read_back(path) -> dict:
    """{source: {records, target_tokens}} of a KD jsonl file: scored natural text (target
    tokens: ids after the first) and teacher completions (target tokens: completion ids, and
    the eos the trainer appends when the teacher stopped)."""
    out = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "ids" in r:
                kind, n = "scored natural text", len(r["ids"]) - 1
            else:
                kind, ids = "teacher completions", r.get("completion_ids")
                n = (len(ids) if ids is not None else r["usage"]["completion_tokens"]) + (
                    r["finish_reason"] == "stop")
            c = out.setdefault(kind, {"records": 0, "target_tokens": 0})
            c["records"] += 1
            c["target_tokens"] += n
    return out


def stage_train_data(p: Pilot):
    """data/train_<name>/: every split of the scored text and of the teacher's completions,
    concatenated (the arms' --data), and manifest.json with what each source holds."""
    scored, mix, out = scored_dir(p.s), kd_dir(p.s), train_data_dir(p.s)
    files = [d / f"{sp}.jsonl" for d in (scored, mix) for sp in SPLITS]

    def run():
        manifest = {"sources": {"scored natural text": str(scored),
                                "teacher completions": str(mix)}, "splits": {}}
        with atomic_dir(out) as tmp:
            for sp in SPLITS:
                parts = [d / f"{sp}.jsonl" for d in (scored, mix) if (d / f"{sp}.jsonl").is_file()]
                if not parts:
                    continue
                with open(tmp / f"{sp}.jsonl", "wb") as f:
                    for part in parts:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, f)
                manifest["splits"][sp] = read_back(tmp / f"{sp}.jsonl")
            if "train" not in manifest["splits"]:
                raise StageError(f"train_data: neither {scored} nor {mix} has a train.jsonl")
            write_json_atomic(tmp / "manifest.json", manifest)
        return manifest["splits"]

    return p.stage("train_data", {}, files, [out / "manifest.json"], run)
