"""Held-out evaluation of students against their teacher, with bootstrap 95 % intervals.

* On held-out natural text, per sequence: full-vocabulary KL(teacher || student), CE of the
  next token (perplexity = exp CE) and teacher top-1 agreement. A metric is the token mean
  over sequences; its interval resamples whole sequences (tokens inside one are correlated),
  and a difference between two models resamples the same sequences for both (paired).
* A downstream check: ranking the true next line of held-out code among distractor lines
  from other files by the mean log-likelihood of its tokens after the preceding code
  (accuracy over items; chance is 1 / candidates).
"""

import json

import mlx.core as mx
import numpy as np

from mlx_student.losses import kl_divergence, log_softmax

STATS = ("kl", "ce", "top1_agree")


def sequence_stats(models: dict, teacher, batches) -> dict:
    """{name: (sequences, 4) array of per-sequence sums [KL, CE, top-1 agreements, tokens]}
    for every model in `models` (and "teacher", whose KL and agreement are 0 and 1) over
    `batches` ((B, L) token arrays, every position a target)."""
    out = {name: [] for name in [*models, "teacher"]}
    for inputs in batches:
        inputs = mx.array(inputs)
        x, y = inputs[:, :-1], inputs[:, 1:]
        ref = log_softmax(teacher(x))
        ref_top = mx.argmax(ref, axis=-1)
        mx.eval(ref, ref_top)
        for name, model in [*models.items(), ("teacher", None)]:
            logq = ref if model is None else log_softmax(model(x))
            kl = kl_divergence(ref, logq).sum(axis=1)
            ce = -mx.take_along_axis(logq, y[..., None], axis=-1).squeeze(-1).sum(axis=1)
            agree = (mx.argmax(logq, axis=-1) == ref_top).sum(axis=1)
            rows = mx.stack([kl, ce, agree.astype(mx.float32),
                             mx.full(kl.shape, x.shape[1], mx.float32)], axis=1)
            out[name].append(np.array(rows, np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def next_line_items(path, tokenizer, n_items, context_tokens, candidates, seed=0) -> list:
    """Items of the next-line check from the code documents of a text jsonl: (context ids,
    [true line ids, distractor ids, ...]). True lines are non-blank lines of 16-100 chars
    with at least 5 lines above them, spread evenly over the documents; distractors are
    such lines drawn (seeded) from other documents."""
    docs = [json.loads(line)["text"].split("\n") for line in open(path) if line.strip()]

    def good(s):
        return 16 <= len(s.strip()) <= 100

    spots = [(d, i) for d, lines in enumerate(docs) for i, s in enumerate(lines)
             if i >= 5 and good(s)]
    if len(docs) < 2 or len(spots) < n_items:
        raise ValueError(f"{path}: {len(spots)} candidate lines in {len(docs)} documents; "
                         f"{n_items} items need more")
    rng = np.random.default_rng(seed)
    items = []
    for k in np.linspace(0, len(spots) - 1, n_items).round().astype(int):
        d, i = spots[k]
        context = tokenizer.encode("\n".join(docs[d][:i]) + "\n", add_special_tokens=False)
        true = docs[d][i]
        others = []
        while len(others) < candidates - 1:
            od, oi = spots[rng.integers(len(spots))]
            line = docs[od][oi]
            if od != d and line.strip() != true.strip() and line not in others:
                others.append(line)
        cands = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in [true, *others]]
        items.append((context[-context_tokens:], cands))
    return items


def next_line_correct(model, items, items_per_batch=8) -> np.ndarray:
    """(items,) bool: whether `model` gives the true line (candidate 0) the highest mean
    token log-likelihood after the context."""
    out = []
    for s in range(0, len(items), items_per_batch):
        chunk = items[s : s + items_per_batch]
        rows = [(ctx, c) for ctx, cands in chunk for c in cands]
        width = max(len(ctx) + len(c) for ctx, c in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width - 1), np.float32)
        for j, (ctx, c) in enumerate(rows):
            tokens[j, : len(ctx) + len(c)] = ctx + c
            mask[j, len(ctx) - 1 : len(ctx) + len(c) - 1] = 1
        tokens = mx.array(tokens)
        logq = log_softmax(model(tokens[:, :-1]))
        ll = mx.take_along_axis(logq, tokens[:, 1:, None], axis=-1).squeeze(-1)
        mean = np.array((ll * mx.array(mask)).sum(axis=1)) / mask.sum(axis=1)
        per_item = mean.reshape(len(chunk), -1)
        out += (per_item.argmax(axis=1) == 0).tolist()
    return np.array(out)


def _ratio(stats, idx):
    """Token means of KL, CE and top-1 agreement over the sequences `idx` ((B, n) or (n,))."""
    s = stats[idx].sum(axis=-2)
    return s[..., :3] / s[..., 3:4]


def summarize(stats: dict, lines: dict, control: str, resamples=2000, seed=0) -> dict:
    """Point estimates and bootstrap 95 % intervals (percentile, `resamples` resamples of the
    sequences / items) of every model's metrics, and of each model's difference from
    `control` (paired: the same resamples). `lines`: {name: (items,) bool} of the next-line
    check, or {} without it."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(stats.values())))
    idx = rng.integers(0, n, (resamples, n))
    m = len(next(iter(lines.values()))) if lines else 0  # no next-line check: {}
    line_idx = rng.integers(0, m, (resamples, m))
    out = {"sequences": n, "tokens": int(stats[control][:, 3].sum()), "items": m,
           "resamples": resamples, "models": {}, "minus_control": {}}
    for name, st in stats.items():
        point, boot = _ratio(st, np.arange(n)), _ratio(st, idx)
        row = {k: {"value": float(point[i]), "ci95": np.percentile(boot[:, i], [2.5, 97.5]).tolist()}
               for i, k in enumerate(STATS)}
        row["ppl"] = {"value": float(np.exp(point[1])),
                      "ci95": np.exp(row["ce"]["ci95"]).tolist()}
        if name in lines:
            acc = lines[name].astype(float)
            row["next_line"] = {"value": float(acc.mean()), "ci95": np.percentile(
                acc[line_idx].mean(axis=1), [2.5, 97.5]).tolist()}
        out["models"][name] = row
        if name != control:
            diff = _ratio(st, idx) - _ratio(stats[control], idx)
            point_diff = point - _ratio(stats[control], np.arange(n))
            d = {k: {"value": float(point_diff[i]), "ci95": np.percentile(diff[:, i], [2.5, 97.5])
                     .tolist()} for i, k in enumerate(STATS)}
            if name in lines and control in lines:
                dl = lines[name].astype(float) - lines[control].astype(float)
                d["next_line"] = {"value": float(dl.mean()), "ci95": np.percentile(
                    dl[line_idx].mean(axis=1), [2.5, 97.5]).tolist()}
            out["minus_control"][name] = d
    return out
