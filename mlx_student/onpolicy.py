"""On-policy distillation (GKD, Agarwal et al., arXiv 2306.13649): completions the student samples.

With `on_policy: {lmbda: 0.5, temperature: 1.0, max_new_tokens: 64}` (or
`--on-policy lmbda=0.5,...`) and a teacher in process, a fraction `lmbda` of each step's
batch rows is replaced, before the step, by the row's prompt followed by a completion the
student samples itself (temperature, at most max_new_tokens, ending at an eos); the teacher's
logits on that sequence are the target of the dense KD terms (forward_kl, reverse_kl or
jsd with beta: GKD's generalized JSD), exactly as on the data's own rows. On-policy rows
carry no CE (their tokens are the student's) and no stored targets, so the loss mix may hold
only `ce` (on the data's rows) and dense terms.

Which rows, and every sampled token, are functions of (seed, step, row) and of the model's
weights at that step: the rows from `np.random.default_rng([seed, step])`, each row's sampler
re-seeded from (seed, step, row). A resumed run samples what the uninterrupted one did, and
every data-parallel rank samples the same global batch (each keeps its own rows), so the
step's token counts stay known everywhere.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .batches import PAD_TO

DEFAULTS = {"lmbda": 0.5, "temperature": 1.0, "max_new_tokens": 64}
DENSE = ("forward_kl", "reverse_kl", "jsd")


def on_policy_settings(value, loss, teacher):
    """A run's `on_policy:` mapping with defaults filled in (None: off). `loss`: the run's
    loss weights; `teacher`: whether a teacher runs in process. Raises ValueError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"on_policy: must be a mapping like {DEFAULTS} or null, got {value!r}")
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"on_policy: unknown key(s) {unknown}; known: {list(DEFAULTS)}")
    s = {**DEFAULTS, **value}
    if not (isinstance(s["lmbda"], (int, float)) and 0 <= s["lmbda"] <= 1):
        raise ValueError(f"on_policy.lmbda: a fraction in [0, 1], got {s['lmbda']!r}")
    if not (isinstance(s["temperature"], (int, float)) and s["temperature"] >= 0):
        raise ValueError(f"on_policy.temperature: >= 0 (0: greedy), got {s['temperature']!r}")
    if not (isinstance(s["max_new_tokens"], int) and s["max_new_tokens"] >= 1):
        raise ValueError(f"on_policy.max_new_tokens: an integer >= 1, got {s['max_new_tokens']!r}")
    if not teacher:
        raise ValueError("on_policy: needs a teacher in process (teacher / --teacher) to score "
                         "the student's samples")
    terms = [n for n, w in loss.items() if w]
    if not any(n in DENSE for n in terms) or any(n not in DENSE + ("ce",) for n in terms):
        raise ValueError(f"on_policy: the loss {terms} must hold a dense KD term {list(DENSE)} "
                         "and nothing but ce besides (on-policy rows have no stored targets)")
    return s


def _row_seed(seed, step, row):
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0])


def sample_completion(model, prompt, settings, stop, seed):
    """The student's completion of `prompt` (a list of ids): at most max_new_tokens, the
    first stop (eos) id included. The sampler draws from `mx.random.seed(seed)`."""
    mx.random.seed(seed)
    sampler = make_sampler(settings["temperature"])
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=settings["max_new_tokens"],
                                  sampler=sampler):
        out.append(int(token))
        if out[-1] in stop:
            break
    return out


def on_policy_batch(model, batch, settings, stop, seed, step, max_seq_length, pad_id=0):
    """`batch` (a collated global batch, mlx_student.batches) with round(lmbda * rows with loss
    tokens) of its rows replaced by their prompt + the student's sampled completion.

    A row's prompt is its tokens up to its first loss target. Replaced rows get "mask" 0 and
    "kd_mask" 1 on the completion (cut to max_seq_length); the other rows keep theirs ("kd_mask"
    defaults to their "mask"); the width grows to the longest row, rounded up to 32. Returns
    (batch, rows replaced)."""
    arrays = {k: np.array(v) for k, v in batch.items()}
    mask = arrays["mask"]
    real = np.flatnonzero(mask.any(axis=1))
    n = round(settings["lmbda"] * len(real))
    chosen = np.sort(np.random.default_rng([seed, step]).choice(real, n, replace=False))
    if not n:
        return batch, []
    rows = {}
    for j in chosen:
        start = int(np.argmax(mask[j] != 0))  # first loss target: tokens[start + 1]
        prompt = arrays["inputs"][j, : start + 1].tolist()
        completion = sample_completion(model, prompt, settings, stop, _row_seed(seed, step, int(j)))
        rows[int(j)] = (prompt + completion)[: max_seq_length + 1], len(prompt)
    width = max(arrays["inputs"].shape[1], *(len(t) - 1 for t, _ in rows.values()))
    width = min(PAD_TO * -(-width // PAD_TO), max_seq_length)
    if "kd_mask" not in arrays:
        arrays["kd_mask"] = mask.copy()
    fill = {"inputs": pad_id, "targets": pad_id, "topk_logprobs": -np.inf}
    out = {}
    for name, a in arrays.items():
        grown = np.full((a.shape[0], width) + a.shape[2:], fill.get(name, 0), a.dtype)
        grown[:, : a.shape[1]] = a
        grown[chosen] = fill.get(name, 0)
        out[name] = grown
    for j, (tokens, prompt_len) in rows.items():
        m = len(tokens) - 1
        out["inputs"][j, :m], out["targets"][j, :m] = tokens[:-1], tokens[1:]
        out["kd_mask"][j, prompt_len - 1 : m] = 1
        if "token_weights" in out:
            out["token_weights"][j, prompt_len - 1 : m] = 1
    return {k: mx.array(v) for k, v in out.items()}, [int(j) for j in chosen]
