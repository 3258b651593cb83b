"""Taps for the parity probe: the same token ids through three backends, each returning the same
named intermediate tensors as (rows, channels) fp32 arrays, one call per prefill chunk or decode
step, with the KV cache carried between calls.

    embeddings                    the token embeddings (the residual stream entering layer 0)
    layers.{i}.attention          attention block output (o_proj), before the residual add
    layers.{i}.residual_mid       residual stream after the attention add
    layers.{i}.mlp                MLP block output (down_proj), before the residual add
    layers.{i}.residual           residual stream after the MLP add (the layer's output)
    final_norm                    the final RMSNorm of the chunk's last token (the LM head input)
    logits                        the chunk's last-token logits

Backends:
  MLXRunner      mlx-lm's own model in fp32 (or fp16) with its KVCache, evaluated layer by
                 layer (the same four lines as mlx_lm.models.llama.TransformerBlock, on its
                 own modules)
  MirrorRunner   the PyTorch mirror in fp32 with an explicit cache; its internals are observed
                 by wrapping the mirror instance's `_embed` / `_tap` hooks and the module-global
                 `F.conv2d` of export/mirror.py for the duration of one call (nothing is edited)
  PackageRunner  a function of the saved .mlpackage on the reference MIL executor, through its
                 per-op `observe` hook. MIL op names are whatever the converter derived from torch
                 locals (x_7_cast_fp16, op_553_cast_fp16, ...), so they are NOT used. Taps are found
                 by dataflow instead (`package_tap_map`): every `conv` names its weight, and the
                 weight constants keep the mirror's parameter names through conversion and
                 compression (mirror_layers_{i}_o_proj_to_fp16[_quantized|_palettized]); so
                 o_proj conv -> attention, down_proj conv -> mlp, the `add` consuming each ->
                 residual_mid / residual, the add's other operand at layer 0 -> embeddings, the
                 input of the LM-head convs (weights embed_{j} / head_{j}) -> final_norm, the
                 function output -> logits. The chain is checked (layer i's residual_mid adds to
                 layer i-1's residual), and a tap that cannot be found is reported as unmapped.

`run_windows` drives all three over the same windows (prefill chunks + decode calls); `compare`, `kl`,
`end_to_end` and `tap_table` are the metrics of the probe report (export/probe.py).
"""

import contextlib
import math
import re
import sys
import time
from collections import defaultdict

import numpy as np

FP16_MAX = 65504.0
LAYER_TAPS = ("attention", "residual_mid", "mlp", "residual")
PROJECTION = re.compile(r"layers_(\d+)_(q|k|v|o|gate|up|down)_proj")
VOCAB = re.compile(r"(^|_)(embed|head)_\d+")


class TapMappingError(RuntimeError):
    """The package's program does not have the structure the tap map expects."""


def tap_names(layers: int) -> list:
    return (["embeddings"] + [f"layers.{i}.{k}" for i in range(layers) for k in LAYER_TAPS]
            + ["final_norm", "logits"])


# ---------------------------------------------------------------- MLX (mlx-lm, fp32, KVCache)
class MLXRunner:
    """mlx-lm's model in fp32 (the reference, name "mlx") or in fp16 (name "mlx_fp16": weights
    and activations fp16, mlx-lm's own ops; the probe's fp16 error model, see export/probe.py)."""

    def __init__(self, model_dir, dtype: str = "float32"):
        import mlx.core as mx

        from mlx_student.hf_config import load

        self.mx = mx
        self.name = "mlx" if dtype == "float32" else f"mlx_{dtype.replace('float', 'fp')}"
        self.description = f"mlx_lm ({dtype.replace('float', 'fp')}, KVCache), evaluated " \
                           "layer by layer"
        self.model, _ = load(model_dir)
        self.model.set_dtype(getattr(mx, dtype))
        self.cache = None

    def reset(self):
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)

    def step(self, ids: np.ndarray, pos: int) -> dict:
        from mlx_lm.models.base import create_attention_mask

        mx, m = self.mx, self.model.model
        if self.cache[0].offset != pos:
            raise ValueError(f"MLX cache is at {self.cache[0].offset}, the call is at {pos}")
        x = m.embed_tokens(mx.array(np.asarray(ids, np.int32)[None]))
        taps = {"embeddings": x}
        mask = create_attention_mask(x, self.cache[0])
        for i, (layer, c) in enumerate(zip(m.layers, self.cache)):
            a = layer.self_attn(layer.input_layernorm(x), mask, c)  # TransformerBlock.__call__
            h = x + a
            f = layer.mlp(layer.post_attention_layernorm(h))
            x = h + f
            taps.update({f"layers.{i}.attention": a, f"layers.{i}.residual_mid": h,
                         f"layers.{i}.mlp": f, f"layers.{i}.residual": x})
        n = m.norm(x[:, -1:])
        logits = (m.embed_tokens.as_linear(n) if self.model.args.tie_word_embeddings
                  else self.model.lm_head(n))
        taps.update(final_norm=n, logits=logits)
        mx.eval(list(taps.values()))
        return {k: np.array(v[0], dtype=np.float32) for k, v in taps.items()}


# ---------------------------------------------------------------- the PyTorch mirror (fp32)
class _RecordingF:
    """torch.nn.functional with conv2d recording (weight, output) pairs."""

    def __init__(self, real, record):
        self._real, self._record = real, record

    def conv2d(self, x, weight, *args, **kwargs):
        out = self._real.conv2d(x, weight, *args, **kwargs)
        self._record.append((weight, x, out))
        return out

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def observe_mirror(mirror):
    """Record the mirror's internals during one call: yields a dict that fills with
    'embed' (output of _embed), 'residual' (every _tap('residual', x)) and 'conv'
    ((weight, input, output) of every conv2d)."""
    from . import mirror as mirror_module

    rec = {"embed": None, "residual": [], "conv": []}
    embed, tap = mirror._embed, mirror._tap

    def _embed(ids, T):
        rec["embed"] = embed(ids, T)
        return rec["embed"]

    def _tap(name, x):
        if name == "residual":
            rec["residual"].append(x.detach())
        return tap(name, x)

    real_f = mirror_module.F
    mirror._embed, mirror._tap = _embed, _tap  # instance attributes shadow the methods
    mirror_module.F = _RecordingF(real_f, rec["conv"])
    try:
        yield rec
    finally:
        mirror_module.F = real_f
        del mirror._embed, mirror._tap


def _channels_first_rows(x) -> np.ndarray:
    """(1, C, 1, T) -> (T, C) fp32."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(x.shape[1], x.shape[-1]).T.copy()


class MirrorRunner:
    name = "mirror"
    description = "PyTorch mirror (fp32, explicit KV cache)"

    def __init__(self, mirror, context: int):
        self.mirror, self.context, self.fns = mirror, context, {}
        self.k = self.v = None
        self.audit = {}  # max |x| of the mirror's fp16-audit taps (export/audit.py) over all calls

    def reset(self):
        import torch

        shape = self.mirror.cache_shape(self.context)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)

    def step(self, ids: np.ndarray, pos: int) -> dict:
        import torch

        T, mirror = len(ids), self.mirror
        if T not in self.fns:
            self.fns[T] = mirror.function(T, self.context).eval()
        i32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.int32)  # noqa: E731
        mirror.taps = self.audit
        try:
            with torch.no_grad(), observe_mirror(mirror) as rec:
                logits, self.k, self.v = self.fns[T](i32(ids)[None], i32([pos]), self.k, self.v)
        finally:
            mirror.taps = None
        by_weight = {id(w): (x, out) for w, x, out in rec["conv"]}
        res = rec["residual"]
        if len(res) != 2 * len(mirror.layers):
            raise TapMappingError(f"mirror: {len(res)} residual taps for {len(mirror.layers)} "
                                  "layers (export/mirror.py no longer taps each block)")
        taps = {"embeddings": _channels_first_rows(rec["embed"])}
        for i, lyr in enumerate(mirror.layers):
            taps[f"layers.{i}.attention"] = _channels_first_rows(by_weight[id(lyr.o_proj)][1])
            taps[f"layers.{i}.residual_mid"] = _channels_first_rows(res[2 * i])
            taps[f"layers.{i}.mlp"] = _channels_first_rows(by_weight[id(lyr.down_proj)][1])
            taps[f"layers.{i}.residual"] = _channels_first_rows(res[2 * i + 1])
        taps["final_norm"] = _channels_first_rows(by_weight[id(mirror.head[0])][0])
        taps["logits"] = logits[0].numpy().astype(np.float32)
        return taps


# ---------------------------------------------------------------- the package (MIL executor)
def package_tap_map(program, layers: int) -> tuple:
    """({MIL var name: tap name}, [unmapped tap names]) for one function of a saved package,
    found by dataflow from the conv weights' names (see the module docstring)."""
    consumers = defaultdict(list)
    for op in program.ops:
        for args in op.inputs.values():
            for kind, a in args:
                if kind == "var":
                    consumers[a].append(op)

    def the_add(var):
        """(output, other operand) of the residual add consuming `var`."""
        adds = [op for op in consumers[var] if op.type == "add"]
        if len(adds) != 1:
            return None, None
        ops = [a for args in adds[0].inputs.values() for kind, a in args if kind == "var"]
        other = [a for a in ops if a != var]
        return adds[0].outputs[0].name, (other[0] if len(other) == 1 else None)

    found, head_inputs = {}, set()
    for op in program.ops:
        if op.type != "conv" or "weight" not in op.inputs:
            continue
        kind, weight = op.inputs["weight"][0]
        if kind != "var":
            continue
        m = PROJECTION.search(weight)
        if m and int(m.group(1)) < layers and m.group(2) in ("o", "down"):
            tap = "attention" if m.group(2) == "o" else "mlp"
            found[f"layers.{m.group(1)}.{tap}"] = op.outputs[0].name
        elif VOCAB.search(weight):
            head_inputs.add(op.inputs["x"][0][1])
    if len(head_inputs) == 1:
        found["final_norm"] = head_inputs.pop()
    for i in range(layers):
        a = found.get(f"layers.{i}.attention")
        if a is None:
            continue
        mid, before = the_add(a)
        if mid is None:
            continue
        prev = "embeddings" if i == 0 else f"layers.{i - 1}.residual"
        if i == 0 and before is not None:
            found["embeddings"] = before
        elif found.get(prev) != before:
            raise TapMappingError(f"{program.function}: layer {i}'s attention add reads "
                                  f"'{before}', not layer {i - 1}'s residual '{found.get(prev)}'")
        found[f"layers.{i}.residual_mid"] = mid
        f = found.get(f"layers.{i}.mlp")
        if f is not None:
            out, before = the_add(f)
            if out is not None and before == mid:
                found[f"layers.{i}.residual"] = out
    if len(program.output_names) == 1:
        found["logits"] = program.output_names[0]
    names = tap_names(layers)
    return {v: k for k, v in found.items()}, [t for t in names if t not in found]


class PackageRunner:
    """Functions of a saved .mlpackage on the reference MIL executor (with taps), or through
    CoreML's MLModel.predict on macOS (end to end only: CoreML has no per-op hook)."""

    name = "coreml"

    def __init__(self, path, functions: dict, layers: int, backend: str = "executor"):
        """functions: {tokens per call: function name}."""
        from . import mil_executor

        self.path, self.functions, self.backend = path, dict(functions), backend
        self.programs, self.maps, self.unmapped = {}, {}, {}
        self.models = {}
        for T, fn in self.functions.items():
            prog = mil_executor.load(path, fn)
            self.programs[T] = prog
            self.maps[T], self.unmapped[fn] = package_tap_map(prog, layers)
            if backend == "coreml":
                import coremltools as ct

                self.models[T] = ct.models.MLModel(str(path), function_name=fn)
        self.description = ("CoreML MLModel.predict (macOS); taps from the reference MIL "
                            "executor" if backend == "coreml" else
                            "reference MIL executor (export/mil_executor.py: numpy, fp16 "
                            "emulation, fp16 KV state)")
        self.state = None

    def reset(self):
        if self.backend == "coreml":
            self.state = self.models[next(iter(self.models))].make_state()
        self.exec_state = next(iter(self.programs.values())).make_state()

    def step(self, ids: np.ndarray, pos: int) -> dict:
        T = len(ids)
        inputs = {"input_ids": np.asarray(ids, np.int32)[None],
                  "position": np.array([pos], np.int32)}
        mapping, got = self.maps[T], {}

        def observe(op, values):
            for var, value in zip(op.outputs, values):
                tap = mapping.get(var.name)
                if tap is not None:
                    got[tap] = value

        prog = self.programs[T]
        outputs, new = prog.run(inputs, self.exec_state.values, observe=observe)
        self.exec_state.values.update(new)
        taps = {}
        for tap, v in got.items():
            v = np.asarray(v, np.float32)
            taps[tap] = v.reshape(1, -1) if tap == "logits" else _channels_first_rows(v)
        if self.backend == "coreml":
            out = self.models[T].predict(inputs, self.state)
            taps["logits"] = np.asarray(out["logits"], np.float32).reshape(1, -1)
        return taps


def package_backend(choice: str, package) -> str:
    """What runs the package: "coreml" (MLModel.predict, macOS) or "executor"."""
    if choice != "auto":
        if choice == "coreml" and sys.platform != "darwin":
            raise ValueError("--backend coreml needs macOS (MLModel.predict); use executor")
        return choice
    if sys.platform != "darwin":
        return "executor"
    try:
        import coremltools as ct

        from . import mil_executor

        m = ct.models.MLModel(str(package), function_name=mil_executor.functions(package)[0])
        return "coreml" if getattr(m, "__proxy__", None) is not None else "executor"
    except Exception:  # noqa: BLE001 (any failure to load for prediction: run the executor)
        return "executor"


def headroom(x) -> dict:
    m = float(np.abs(x).max())
    return {"max_abs": m, "fp16_headroom": FP16_MAX / m if m else math.inf}


# ---------------------------------------------------------------- running all backends
def chunk_schedule(n: int, prefill_lengths) -> list:
    """Tokens per call for an `n`-token prompt through a package: the longest prefill function
    that fits the tokens left, then decode calls (1) for the rest. E.g. 300 tokens with prefill
    64 and 16: [64, 64, 64, 64, 16, 16, 1 x 12]. The CoreML engine and the probe feed prompts so."""
    lengths, out = sorted((t for t in prefill_lengths if t > 1), reverse=True), []
    while n:
        out.append(next((t for t in lengths if t <= n), 1))
        n -= out[-1]
    return out


def run_windows(runners, ids, prompt_calls, decode_steps: int, windows: int) -> dict:
    """Every runner over the same windows: each starts from an empty cache at position 0, feeds
    its prompt as calls of `prompt_calls` tokens each (prefill chunks, then decode calls; see
    `chunk_schedule`), then `decode_steps` decode calls, every call at the running position.
    Returns {runner name: {"taps": {tap: (rows, C)}, "logits": (calls, vocab)}, "labels":
    [{"window", "step", "tokens", "position"}], "next": next-token ids, "seconds": {...}}."""
    prompt = int(sum(prompt_calls))
    sizes = list(prompt_calls) + [1] * decode_steps
    span = prompt + decode_steps
    out = {r.name: {"taps": {}, "logits": []} for r in runners}
    seconds = {r.name: 0.0 for r in runners}
    labels, nexts = [], []
    for w in range(windows):
        chunk = ids[w * (span + 1): (w + 1) * (span + 1)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        calls = [(chunk[pos:pos + T], int(pos)) for T, pos in zip(sizes, starts)]
        for step, (x, pos) in enumerate(calls):
            labels.append({"window": w, "step": step, "tokens": len(x),
                           "position": pos + len(x) - 1})
            nexts.append(int(chunk[pos + len(x)]))
        for r in runners:
            t0 = time.perf_counter()
            r.reset()
            for x, pos in calls:
                got = r.step(x, pos)
                for name, v in got.items():
                    out[r.name]["taps"].setdefault(name, []).append(v)
            seconds[r.name] += time.perf_counter() - t0
    for r in runners:
        taps = {k: np.concatenate(v) for k, v in out[r.name]["taps"].items()}
        out[r.name] = {"taps": taps, "logits": taps["logits"]}
    return {**out, "labels": labels, "next": np.array(nexts), "seconds": seconds}


def end_to_end(ref_logits, logits, labels, nexts) -> dict:
    """top-1 agreement and KL(ref || other) over all calls' last positions, prefill-function
    calls vs decode calls, and per step (the call's index in its window)."""
    agree = logits.argmax(-1) == ref_logits.argmax(-1)
    kls = kl(ref_logits, logits)
    steps = np.array([lb["step"] for lb in labels])
    tokens = np.array([lb["tokens"] for lb in labels])
    pick = lambda m: {"positions": int(m.sum()), "top1": float(agree[m].mean()) if m.any()  # noqa: E731
                      else math.nan, "kl_mean": float(kls[m].mean()) if m.any() else math.nan,
                      "kl_max": float(kls[m].max()) if m.any() else math.nan}
    return {**pick(np.ones_like(agree)), "prefill": pick(tokens > 1), "decode": pick(tokens == 1),
            "per_step": [pick(steps == s) for s in range(int(steps.max()) + 1)],
            "next_token_accuracy": float((logits.argmax(-1) == nexts).mean())}


def reference_sharpness(logits) -> dict:
    """Mean entropy and top-1 probability of the reference distributions (a near-uniform
    model makes top-1 a coin toss between near-ties and KL trivially small)."""
    lp = log_softmax(logits)
    p = np.exp(lp)
    return {"mlx_entropy_mean": float(-(p * lp).sum(-1).mean()),
            "mlx_top1_prob_mean": float(p.max(-1).mean())}


def tap_table(test: dict, ref: dict, names) -> dict:
    return {n: compare(test[n], ref[n]) for n in names if n in test and n in ref}


# ---------------------------------------------------------------- metrics
def compare(test, ref) -> dict:
    """max abs err, rel err ||t - r|| / ||r||, cosine, and max |t| with its fp16 headroom."""
    t, r = np.asarray(test, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    if t.shape != r.shape:
        raise ValueError(f"shapes differ: {t.shape} vs {r.shape}")
    max_abs = float(np.abs(t).max()) if t.size else 0.0
    out = {"max_abs": max_abs, "fp16_headroom": FP16_MAX / max_abs if max_abs else math.inf,
           "nonfinite": int((~np.isfinite(t)).sum())}
    if out["nonfinite"]:
        return {**out, "max_abs_err": math.inf, "rel_err": math.inf, "cosine": math.nan}
    d = t - r
    nr, nt = float(np.linalg.norm(r)), float(np.linalg.norm(t))
    out.update(max_abs_err=float(np.abs(d).max()) if d.size else 0.0,
               rel_err=float(np.linalg.norm(d) / nr) if nr else float(np.linalg.norm(d)),
               cosine=float(t @ r / (nt * nr)) if nt and nr else float(nt == nr))
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl(ref_logits, test_logits) -> np.ndarray:
    """KL(ref || test) per row, in nats (fp64)."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    with np.errstate(invalid="ignore"):
        out = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.where(np.isfinite(out), out, np.inf)
