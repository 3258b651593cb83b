"""Needle-in-a-haystack cases, built in token space so every needle sits at an exact position.

The protocol is NVIDIA RULER's NIAH family (Hsieh et al., "RULER: What's the Real Context Size of
Your Long-Context Language Models?", arXiv 2404.06654) over gkamradt's depth x length grid:

    single      one needle "One of the special magic numbers for {key} is: {value}."; asked for its value
    multikey    the target needle plus 3 needles with other keys (distractors); asked for the target
    multivalue  4 needles with the same key and 4 values; asked for all 4
    multiquery  4 needles with 4 keys; asked for all 4 values

Haystacks are real local prose or RULER's noise: `docs` (the Python documentation's reST sources),
`stdlib` (the CPython standard-library corpus, data/stdlib/test.jsonl), `noise` ("The grass is
green. ..." repeated). Keys are adjective-noun words, values 7-digit numbers, as in RULER.

A case's prompt is token ids (chat template around the context, the answer prefix after it), of
exactly `length - max_new_tokens` tokens, so prompt plus answer fit in `length`. The target
needle's first token sits at prompt position `prefix + round(depth * (n_context - n_needle))`:
depth 0 starts the context with it, depth 1 ends the context with it. The haystack is a slice of
the tokenized corpus chosen so the target needle follows a line break (no word is cut there);
other needles sit at random non-overlapping token positions. Positions are exact because the
prompt is assembled from separately tokenized pieces, never re-tokenized.

Scoring (RULER's `string_match_all`): the fraction of the expected values that occur in the
answer, case-insensitively. Beside it, the teacher-forced log-probability of the first expected
value after the answer prefix and its rank among `n_candidates` values (the distractor needles'
values first, then random ones), which still orders models too small to answer.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

KINDS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("docs", "stdlib", "noise")
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
STDLIB_FILE = Path("data/stdlib/test.jsonl")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLES_PER_CASE = {"single": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
         "it. I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = {
    "single": "What is the special magic number for {keys} mentioned in the provided text?",
    "multikey": "What is the special magic number for {keys} mentioned in the provided text?",
    "multivalue": "What are all the special magic numbers for {keys} mentioned in the provided text?",
    "multiquery": "What are all the special magic numbers for {keys} mentioned in the provided text?",
}
ANSWER_PREFIX = {
    "single": "The special magic number for {keys} mentioned in the provided text is",
    "multikey": "The special magic number for {keys} mentioned in the provided text is",
    "multivalue": "The special magic numbers for {keys} mentioned in the provided text are",
    "multiquery": "The special magic numbers for {keys} mentioned in the provided text are",
}
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy",
              "jolly", "keen", "lucky", "mellow", "nimble", "odd", "proud", "quiet", "rapid",
              "silent", "tidy", "upbeat", "vivid", "witty", "young", "zesty", "bitter", "clever",
              "daring", "fierce", "grumpy")
NOUNS = ("anchor", "barrel", "candle", "dolphin", "engine", "falcon", "garden", "harbor",
         "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper",
         "quarry", "river", "saddle", "tunnel", "umbrella", "violin", "wagon", "yacht", "zipper",
         "beacon", "cactus", "donkey", "ember", "fossil")


@dataclass
class Case:
    """One prompt. `needles`: [{key, value, start, length}] with `start` the prompt position of
    the needle's first token; `answers`: the values the answer must contain; `candidates`: the
    values ranked by log-probability, the expected one first."""

    kind: str
    haystack: str
    length: int
    depth: float
    index: int
    prompt_ids: List[int]
    context_start: int
    context_length: int
    needles: List[dict]
    answers: List[str]
    candidates: List[str]
    max_new_tokens: int
    messages: List[dict] = field(default_factory=list)  # the same prompt as chat text (HTTP)


def corpus_text(haystack: str, min_chars: int, root: Path = Path(".")) -> str:
    """At least `min_chars` characters of the named haystack (all of it if it is shorter)."""
    if haystack == "noise":
        return "\n".join([NOISE] * (min_chars // len(NOISE) + 1))
    parts, n = [], 0
    if haystack == "docs":
        if not DOCS_DIR.is_dir():
            raise FileNotFoundError(f"{DOCS_DIR}: the Python docs sources are missing "
                                    "(Debian package python3.11-doc)")
        for f in sorted(DOCS_DIR.rglob("*.txt")):
            parts.append(f.read_text(errors="replace").strip())
            n += len(parts[-1])
            if n >= min_chars:
                break
    elif haystack == "stdlib":
        path = root / STDLIB_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: the stdlib corpus is missing "
                                    "(scripts/make_text_corpus.py writes it)")
        with path.open() as f:
            for line in f:
                parts.append(json.loads(line)["text"].strip())
                n += len(parts[-1])
                if n >= min_chars:
                    break
    else:
        raise ValueError(f"unknown haystack {haystack!r}: one of {', '.join(HAYSTACKS)}")
    return "\n\n".join(parts)


class Haystack:
    """A tokenized corpus and the positions where a line starts (a needle goes there)."""

    def __init__(self, tokenizer, haystack: str, min_tokens: int, root: Path = Path(".")):
        self.name = haystack
        text = corpus_text(haystack, 5 * min_tokens, root)
        self.ids = tokenizer.encode(text, add_special_tokens=False)
        if len(self.ids) < min_tokens:
            raise ValueError(f"haystack {haystack!r} has {len(self.ids)} tokens; {min_tokens} needed")
        ends_line = {t: tokenizer.decode([t]).endswith("\n") for t in set(self.ids)}
        self.line_starts = np.array([0] + [j for j in range(1, len(self.ids)) if ends_line[self.ids[j - 1]]])

    def slice(self, n: int, before: int, rng) -> List[int]:
        """`n` consecutive tokens whose token `before` starts a line (any slice if none fits)."""
        ok = self.line_starts[(self.line_starts >= before) & (self.line_starts - before + n <= len(self.ids))]
        start = int(rng.choice(ok)) - before if len(ok) else int(rng.integers(0, len(self.ids) - n + 1))
        return self.ids[start:start + n]


def _chat_pieces(tokenizer, user_before: str, user_after: str, answer_prefix: str):
    """Token ids before and after the context: the chat template (when the tokenizer has one)
    around `user_before + context + user_after`, then the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063CONTEXT\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
        pre, post = text.split(marker)
        return (tokenizer.encode(pre + user_before, add_special_tokens=False),
                tokenizer.encode(user_after + post + answer_prefix, add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + tokenizer.encode(user_before, add_special_tokens=False),
            tokenizer.encode(user_after + "\n" + answer_prefix, add_special_tokens=False))


def _random_keys(rng, n):
    pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def _random_values(rng, n, exclude=()):
    out = []
    while len(out) < n:
        v = str(int(rng.integers(1_000_000, 10_000_000)))
        if v not in out and v not in exclude:
            out.append(v)
    return out


def _place(rng, n_context: int, lengths: List[int], target_start: int) -> List[int]:
    """Starts of needles 1.. at random token positions in [0, n_context) that overlap neither
    each other nor needle 0 (at `target_start`)."""
    taken = [(target_start, target_start + lengths[0])]
    starts = [target_start]
    for n in lengths[1:]:
        for _ in range(10_000):
            s = int(rng.integers(0, n_context - n + 1))
            if all(s + n <= a or s >= b for a, b in taken):
                break
        else:
            raise ValueError(f"no room for {len(lengths)} needles in {n_context} context tokens")
        taken.append((s, s + n))
        starts.append(s)
    return starts


def make_case(tokenizer, haystack: Haystack, kind: str, length: int, depth: float, index: int,
              max_new_tokens: int, n_candidates: int = 10, seed: int = 0) -> Case:
    """The case (kind, length, depth, index); the same arguments always give the same case."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    rng = np.random.default_rng([seed, KINDS.index(kind), length, round(depth * 1000), index])
    n = NEEDLES_PER_CASE[kind]
    keys = _random_keys(rng, n)
    if kind == "multivalue":
        keys = [keys[0]] * n
    values = _random_values(rng, n)
    asked = keys[:1] if kind in ("single", "multikey", "multivalue") else keys
    ask = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
    question = QUESTION[kind].format(keys=ask)
    prefix_text = ANSWER_PREFIX[kind].format(keys=ask)
    before, after = _chat_pieces(tokenizer, INTRO + "\n", "\n" + question, prefix_text)
    needle_ids = [tokenizer.encode(NEEDLE.format(key=k, value=v) + "\n", add_special_tokens=False)
                  for k, v in zip(keys, values)]
    n_context = length - max_new_tokens - len(before) - len(after)
    lengths = [len(x) for x in needle_ids]
    if n_context < 2 * sum(lengths):
        raise ValueError(f"length {length} leaves {n_context} context tokens: too short for "
                         f"{n} needle(s) of {sum(lengths)} tokens")
    target = round(depth * (n_context - lengths[0]))
    starts = _place(rng, n_context, lengths, target)
    order = sorted(range(n), key=lambda i: starts[i])
    n_hay = n_context - sum(lengths)
    hay_before_target = target - sum(lengths[i] for i in range(n) if starts[i] < target)
    hay = haystack.slice(n_hay, hay_before_target, rng)
    context, cursor, used = [], 0, 0
    for i in order:
        take = starts[i] - cursor
        context += hay[used:used + take] + needle_ids[i]
        used += take
        cursor = starts[i] + lengths[i]
    context += hay[used:]
    assert len(context) == n_context
    prompt = before + context + after
    answers = values if kind in ("multivalue", "multiquery") else values[:1]
    in_context = values[1:] if kind == "multikey" else []
    candidates = [values[0]] + in_context
    candidates += _random_values(rng, n_candidates - len(candidates), exclude=values)
    needles = [{"key": k, "value": v, "start": len(before) + s, "length": n_}
               for k, v, s, n_ in zip(keys, values, starts, lengths)]
    user = INTRO + "\n" + tokenizer.decode(context) + "\n" + question
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": prefix_text}]
    return Case(kind, haystack.name, length, depth, index, prompt, len(before), n_context,
                needles, answers, candidates, max_new_tokens, messages)


def string_match_all(prediction: str, references: List[str]) -> float:
    """RULER's metric: the fraction of `references` found in `prediction`, case-insensitively."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def rank_of_first(scores: List[float]) -> int:
    """1-based rank of scores[0] among all scores (ties count against it)."""
    return 1 + sum(s >= scores[0] for s in scores[1:])
