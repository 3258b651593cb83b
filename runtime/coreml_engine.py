"""The CoreML engine: a multifunction package from mlx_student.export, behind the same engine
contract as MLXEngine (runtime/generate.py), so the same decode loop, samplers and logits
processors drive it.

A prompt is fed in the package's enumerated prefill chunks (the longest that fits, at the
running position), the rest token by token through the decode function; every function reads
and writes the same fp16 KV state. On macOS MLModel.predict runs the functions; elsewhere the
reference MIL executor (export/mil_executor.py) does: numerically faithful (fp16 after every
op) and slow, for correctness only. Speed numbers need macOS.
"""

import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from export import mil_executor
from export.taps import chunk_schedule


class CoreMLCache:
    """The stream's KV state and position; mlx-lm's cache API as far as generate_step uses it."""

    def __init__(self, state):
        self.kv, self.offset = state, 0
        self.state = []  # nothing for mx.eval: the KV lives in the package's state

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Rewind `n` positions. Nothing is erased: the causal mask hides every key past the
        position, and the next chunk overwrites them before it attends."""
        n = min(self.offset, n)
        self.offset -= n
        return n


class CoreMLEngine:
    name = "coreml"

    def __init__(self, package, tokenizer, context=None, backend="auto", prefill_lengths=None):
        """`prefill_lengths`: use only these of the package's prefill functions (default all;
        a smaller chunk bounds the executor's memory: a 512-token chunk at context 16384 has
        GBs of attention scores)."""
        package = Path(package)
        names = mil_executor.functions(package)
        contexts = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(r"decode_ctx(\d+)", n))})
        if not contexts:
            raise ValueError(f"{package}: no decode_ctx<S> function; was it made by mlx_student.export?")
        if context is not None and context not in contexts:
            raise ValueError(f"{package}: context {context} not exported; it has {contexts}")
        self.context = context or contexts[-1]
        prefills = [int(m.group(1)) for n in names
                    if (m := re.fullmatch(rf"prefill_(\d+)_ctx{self.context}", n))]
        if prefill_lengths is not None:
            missing = sorted(set(prefill_lengths) - set(prefills))
            if missing:
                raise ValueError(f"{package}: no prefill function of {missing} tokens at context "
                                 f"{self.context}; it has {sorted(prefills)}")
            prefills = list(prefill_lengths)
        if backend == "auto":
            backend = "coreml" if sys.platform == "darwin" else "executor"
        self.backend = backend
        tic = time.perf_counter()
        load = self._mlmodel if backend == "coreml" else (lambda p, f: mil_executor.load(p, f))
        self.decode = load(package, f"decode_ctx{self.context}")
        self.prefill = {T: load(package, f"prefill_{T}_ctx{self.context}") for T in sorted(prefills, reverse=True)}
        self.load_s = time.perf_counter() - tic
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        self.layers = []  # no per-layer MLX cache (mlx-lm's speculative step slices one per layer)

    @classmethod
    def load(cls, package, model_dir, **kw) -> "CoreMLEngine":
        """`model_dir`: the student folder the package was exported from (for its tokenizer)."""
        return cls(package, load_tokenizer(Path(model_dir)), **kw)

    @staticmethod
    def _mlmodel(package, function):
        import coremltools as ct

        return ct.models.MLModel(str(package), function_name=function)

    def make_cache(self) -> list:
        return [CoreMLCache(self.decode.make_state())]

    def chunks(self, n: int) -> list:
        """Tokens per call for `n` prompt tokens: the longest prefill that fits, then decode steps."""
        return chunk_schedule(n, self.prefill)

    def _run(self, fn, ids, cache):
        out = fn.predict({"input_ids": np.asarray(ids, np.int32)[None],
                          "position": np.array([cache.offset], np.int32)}, cache.kv)
        cache.offset += len(ids)
        return out["logits"]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(1, T) ids -> (1, 1, vocab) logits of the last token (all generate_step reads)."""
        cache = cache[0]
        ids = np.array(inputs)[0].tolist()
        if cache.offset + len(ids) > self.context:
            raise ValueError(f"{cache.offset + len(ids)} tokens exceed the package's context {self.context}")
        i, logits = 0, None
        for n in self.chunks(len(ids)):
            logits = self._run(self.prefill[n] if n > 1 else self.decode, ids[i : i + n], cache)
            i += n
        return mx.array(np.asarray(logits, np.float32).reshape(1, 1, -1))
