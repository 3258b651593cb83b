"""Export a trained student to CoreML (and optionally ONNX).

    mlx_student.export --model runs/pilot --config configs/export.yaml --out artifacts/pilot

Stages: read the checkpoint into the PyTorch mirror (no MLX), fp16 headroom audit, mirror vs
MLX parity, convert + compress every enumerated function, merge them into one multifunction
.mlpackage, write export_manifest.json (and ONNX files with --onnx). The output folder is
written atomically: a failed export leaves the previous one untouched.
Command-line flags override the config file, which overrides CONFIG_DEFAULTS (as mlx_lm.lora).
A QAT checkpoint (config.json `student.qat`) sets the compression it was trained for (int8, or
int4 with its group size as the block; the embedding too when it was quantized); only
compression flags on the command line override that. Where the format is the QAT's, the package
holds the checkpoint's own integers and scales (from its qat_scales.safetensors), so it
dequantizes to the QAT weights bit for bit in fp16.

The manifest's `compression` is read back from the saved package's MIL program
(export/compress.py `read_storage`): each role's stored format, the count of constants per
format, and `differs`, every weight stored otherwise than requested with the reason (coremltools
skips a LUT whose group size does not divide the rows; a tied model's LM head is the
embedding). An export whose package differs from the request fails with exit 1 and writes
nothing, unless --allow-partial (the manifest then records what is stored); the request is kept
under `compression.requested`.
"""

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from mlx_student.config import ConfigError, apply_config
from mlx_student.files import atomic_dir, check_replaceable
from mlx_student.run_settings import choice, flag, integer, number, problems, raise_problems

from . import audit as fp16
from .compress import FORMATS, Compression, compress, exact_weights, read_storage
from .convert import ExportError, coremltools, convert_function, describe, package_bytes, plan
from .convert import save_multifunction
from .mirror import UnsupportedModel, load_mirror

CONFIG_DEFAULTS = {
    "model": None,  # the student folder (an mlx-lm model folder)
    "out": None,  # output folder; default artifacts/<model folder name>
    "name": "model",  # <out>/<name>.mlpackage
    "contexts": None,  # enumerated KV-cache lengths; default: the checkpoint's config
    "prefill_lengths": None,  # enumerated prefill chunk lengths; default: the config's
    "compression": {**dataclasses.asdict(Compression()), "lm_head": None},
    "fp16_audit": "fail",  # fail | warn | off
    "fp16_margin": 2.0,  # every audited tap must stay below 65504 / margin
    "calibration": None,  # a text file for the audit; default: Python's json package source
    "calibration_tokens": 256,
    "parity": True,  # mirror vs MLX (fp32, KVCache) into the manifest
    "onnx": False,  # also write ONNX files (prefill and decode with explicit KV)
    "allow_partial": False,  # keep a package whose weights are not all stored as requested
}


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.export",
        description="Export a student to one multifunction CoreML package (prefill/decode per "
        "context, fp16 KV-cache state, int8/4-bit weights) plus export_manifest.json.",
        epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}")
    add = p.add_argument
    add("--model", help="student folder (mlx-lm model folder, e.g. runs/pilot)")
    add("--config", help="YAML with the settings below (flags override it)")
    add("--out", help="output folder (default artifacts/<model name>)")
    add("--name", help="package file name without .mlpackage")
    add("--contexts", type=int, nargs="+", help="KV-cache lengths (default: the checkpoint's)")
    add("--prefill-lengths", type=int, nargs="+", help="prefill chunk lengths")
    add("--weights", choices=FORMATS, help="format of the layer projections")
    add("--embedding", choices=FORMATS, help="format of the embedding (and tied LM head)")
    add("--lm-head", choices=FORMATS, help="format of an untied LM head")
    add("--block-size", type=int, help="int4 block size along the input axis")
    add("--lut-group-size", type=int, help="output channels per LUT (lut4/lut8)")
    add("--lut-mode", choices=("uniform", "kmeans"), help="how LUT entries are chosen")
    add("--fp16-audit", choices=("fail", "warn", "off"), help="on an fp16 overflow risk")
    add("--fp16-margin", type=float, help="taps must stay below 65504 / margin")
    add("--calibration", help="text file for the fp16 audit")
    add("--calibration-tokens", type=int, help="tokens in the audit batch")
    add("--no-parity", dest="parity", action="store_const", const=False, default=None,
        help="skip the mirror vs MLX check")
    add("--onnx", action="store_const", const=True, default=None, help="also write ONNX")
    add("--allow-partial", action="store_const", const=True, default=None,
        help="keep a package some of whose weights are not stored as requested (the manifest "
        "lists them with the reason); without it such an export fails with exit 1")
    return p


class PartialExport(ExportError):
    """The saved package does not hold the weights as requested (exit 1)."""


BYTES_PER_PARAM = {"fp16": 2.0, "int8": 1.05, "int4": 0.6, "lut4": 0.55, "lut8": 1.05}


def _lengths(v):
    ok = v is None or (isinstance(v, list) and v and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))
    return None if ok else f"must be a list of integers >= 1 (or null), got {v!r}"


RULES = {"contexts": _lengths, "prefill_lengths": _lengths,
         "fp16_audit": choice(("fail", "warn", "off")),
         "fp16_margin": number(lambda x: x >= 1, "a number >= 1 (taps stay below 65504 / it)"),
         "calibration_tokens": integer(2), "parity": flag, "onnx": flag, "allow_partial": flag}
COMPRESSION_RULES = {"block_size": integer(1), "lut_group_size": integer(1),
                     "lut_mode": choice(("uniform", "kmeans")),
                     **{k: choice(FORMATS) for k in ("weights", "embedding")},
                     "lm_head": lambda v: None if v is None else choice(FORMATS)(v)}
COMPRESSION_FLAGS = ("weights", "embedding", "lm_head", "block_size", "lut_group_size", "lut_mode")


def parse_args(argv=None):
    """Command line over the config file over CONFIG_DEFAULTS."""
    args = build_parser().parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    settings, lines = apply_config(args, CONFIG_DEFAULTS, what="export setting")
    if isinstance(settings.get("model"), dict):
        raise ConfigError(f"{args.config}:{lines['model']}: model: is an architecture "
                          "mapping; export takes the trained folder (--model runs/x)")
    comp = {**CONFIG_DEFAULTS["compression"], **(args.compression or {})}
    bad = [k for k in comp if k not in CONFIG_DEFAULTS["compression"]]
    if bad:
        raise ConfigError(f"{args.config}: compression: unknown keys {bad}")
    args.compression_flags = [k for k in COMPRESSION_FLAGS if getattr(args, k) is not None]
    for k in COMPRESSION_FLAGS:
        v = getattr(args, k)
        if v is not None:
            comp[k] = v
        delattr(args, k)
    args.compression = comp
    found = problems(args, RULES) + [
        (k if k in args.compression_flags else f"compression.{k}", msg)
        for k, msg in problems(argparse.Namespace(**comp), COMPRESSION_RULES)]
    raise_problems(found, args.config, lines, given)
    if not args.model:
        raise ConfigError("no model: pass --model runs/x (or model: in the config file)")
    return args


def qat_compression(comp: dict, qat, flags=(), tied: bool = False) -> dict:
    """`comp` with the formats a QAT checkpoint trained on, except those set by `flags`; a
    tied model's LM head is its embedding (no format of its own)."""
    if not qat:
        return comp
    fmt = {8: "int8", 4: "int4"}[qat["bits"]]
    picked = {"weights": fmt, "block_size": qat["group_size"]}
    if qat["embeddings"]:
        picked.update(embedding=fmt, **({} if tied else {"lm_head": fmt}))
    return {**comp, **{k: v for k, v in picked.items() if k not in flags}}


def checkpoint_hash(path) -> dict:
    """sha256 of config.json and the weight files, and one over all of them."""
    path = Path(path)
    files = sorted([path / "config.json", *path.glob("*.safetensors")])
    each, total = {}, hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        each[f.name] = h.hexdigest()
        total.update(f"{f.name}:{each[f.name]}\n".encode())
    return {"sha256": total.hexdigest(), "files": each}


def check_space(folder: Path, need: int):
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ExportError(f"no space left: the export needs about {need / 1e9:.2f} GB under "
                          f"{folder}, {free / 1e9:.2f} GB are free")


class Progress:
    def __init__(self, total: int, stream=None):
        self.total, self.i, self.stream, self.times = total, 0, stream or sys.stdout, {}
        self.start = time.perf_counter()

    def stage(self, name: str):
        self.i += 1
        self.name, self.t0 = name, time.perf_counter()
        print(f"[{self.i}/{self.total}] {name} ...", file=self.stream, flush=True)

    def done(self, detail: str = ""):
        dt = time.perf_counter() - self.t0
        self.times[self.name] = round(dt, 3)
        print(f"      {self.name}: {dt:.1f} s{'  ' + detail if detail else ''}",
              file=self.stream, flush=True)


def run(args) -> dict:
    """Export; returns the manifest (also written to <out>/export_manifest.json)."""
    ct = coremltools()
    model_dir = Path(args.model)
    out = Path(args.out or Path("artifacts") / model_dir.name)
    check_replaceable(out)  # before minutes of conversion, not after
    progress = Progress(6 + bool(args.onnx))

    progress.stage("read checkpoint")
    mirror = load_mirror(model_dir)
    config = mirror.config
    comp = Compression(**qat_compression(args.compression, config.qat, args.compression_flags,
                                         config.tie_word_embeddings))
    exact = exact_weights(model_dir, config.qat, mirror.offsets) if config.qat else None
    contexts = list(args.contexts or config.contexts)
    prefill = list(args.prefill_lengths or config.prefill_lengths)
    if max(contexts) > max(config.contexts):
        raise ExportError(f"context {max(contexts)} is above the model's largest context "
                          f"{max(config.contexts)} (its RoPE table and max positions)")
    specs = plan(contexts, prefill)
    params = sum(p.numel() for p in mirror.parameters())
    source = checkpoint_hash(model_dir)
    progress.done(f"{params:,} parameters, {len(specs)} functions, vocab chunks {mirror.rows}"
                  + (f"; QAT checkpoint {config.qat}: weights {comp.weights}" if config.qat else ""))

    progress.stage("fp16 audit")
    T = min(args.calibration_tokens, max(config.contexts))
    text = Path(args.calibration).read_text() if args.calibration else None
    ids = fp16.calibration_ids(model_dir if (model_dir / "tokenizer.json").exists() else None,
                               length=T, rows=1, vocab_size=config.vocab_size, text=text)
    table = fp16.audit(mirror, ids, args.fp16_margin)
    print(fp16.format_table(table))
    fp16.check(table, args.fp16_audit)
    progress.done("ok" if table["ok"] else "OVER THE MARGIN")

    progress.stage("mirror vs MLX parity")
    parity = {"skipped": "--no-parity"}
    if args.parity:
        from .parity import check_mlx

        parity = check_mlx(model_dir, mirror, prefill=min(16, min(contexts) // 2), decode=8)
        if not parity["ok"]:
            print("WARNING: the mirror disagrees with MLX beyond the fp16 error model's bound "
                  f"(prefill {parity['prefill_rel_err']:.2e} vs {parity['prefill_bound']:.2e}, "
                  f"decode {parity['decode_rel_err']:.2e} vs {parity['decode_bound']:.2e})",
                  file=sys.stderr)
    progress.done(", ".join(f"{k} {v:.2e}" for k, v in parity.items() if k.endswith("err")))

    # Each function is saved on its own before the merge deduplicates them, then the package.
    per_param = max(BYTES_PER_PARAM[f] for f in comp.formats())
    est = int(params * per_param * (len(specs) + 1)) + 2 ** 26
    check_space(out.parent, est)
    progress.stage(f"convert and compress {len(specs)} functions")
    models = {}
    for s in specs:
        t0 = time.perf_counter()
        models[s.name] = compress(convert_function(mirror, s), comp, exact)
        print(f"      {s.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    progress.done()

    manifest = {
        "format": "mlx-student-export/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(model_dir), **source},
        "config": config.to_mlx_config(),
        "package": f"{args.name}.mlpackage",
        "parameters": params,
        "coremltools_version": ct.__version__,
        "torch_version": __import__("torch").__version__,
        "minimum_deployment_target": "iOS18 / macOS15",
        "compute_precision": "fp16",
        "layout": {"activations": "(1, C, 1, T) channels-first, 1x1 conv2d projections",
                   "kv_state": "(layers, kv_heads, head_dim, context) fp16, written at position",
                   "vocab_chunks": mirror.rows, "logits": "last token of each call, (1, 1, vocab)"},
        "compression": {"requested": comp.describe(), "qat": config.qat},
        "fp16_audit": table,
        "mirror_parity": parity,
    }
    progress.stage("save multifunction package")
    try:
        with atomic_dir(out) as tmp:
            pkg = save_multifunction(models, tmp / manifest["package"], specs[0].name,
                                     metadata={"mlx_student.source_sha256": source["sha256"]})
            size = package_bytes(pkg)
            stored = read_storage(pkg, comp, config.tie_word_embeddings)
            manifest["compression"].update(stored)
            manifest.update(package_bytes=size, bytes_per_param=size / params)
            progress.done(f"{size / 1e6:.1f} MB, {size / params:.3f} bytes/param (stored: "
                          f"weights {stored['weights']}, embedding {stored['embedding']}, "
                          f"lm_head {stored['lm_head']})")
            if stored["differs"]:
                report = "\n".join(
                    f"  {d['role']}: {len(d['weights']) or 'the'} weight(s) stored {d['stored']},"
                    f" requested {d['requested']}: {d['reason']}" for d in stored["differs"])
                if not args.allow_partial:
                    raise PartialExport(f"the package differs from the request:\n{report}\n"
                                        "nothing written; pass --allow-partial to keep it "
                                        "(the manifest then records what is stored)")
                print(f"WARNING: the package differs from the request (--allow-partial):\n"
                      f"{report}", file=sys.stderr)
            if args.onnx:
                from .onnx_export import export_onnx

                progress.stage("ONNX export")
                manifest["onnx"] = export_onnx(mirror, tmp / "onnx", prefill, contexts)
                progress.done(f"{len(manifest['onnx']['files'])} files, max rel err vs mirror "
                              f"{manifest['onnx']['max_rel_err']:.2e}")
            progress.stage("manifest")
            d = describe(pkg)
            manifest["default_function"] = d["default_function"]
            manifest["functions"] = [{**dataclasses.asdict(s), **{
                k: d["functions"][s.name][k] for k in ("inputs", "outputs", "states")}}
                for s in specs]
            manifest["timings_s"] = {**progress.times, "total": round(
                time.perf_counter() - progress.start, 3)}
            (tmp / "export_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            progress.done(str(out / "export_manifest.json"))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"no space left on the device while writing {out}") from e
        raise
    print(f"wrote {out / manifest['package']} ({len(specs)} functions, "
          f"{manifest['bytes_per_param']:.3f} bytes/param) in "
          f"{manifest['timings_s']['total']:.1f} s")
    return manifest


def main(argv=None):
    args = None
    try:
        args = parse_args(argv)
        run(args)
    except PartialExport as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, ExportError, UnsupportedModel, FileNotFoundError, ValueError,
            fp16.Fp16Overflow) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass  # leaving the block frees the run's frames (and progress bars) before the line
    else:
        return
    # the package is written in atomic_dir: an interrupted export leaves nothing half-written
    where = f"{args.out} is as it was" if args else "nothing was read"
    print(f"interrupted: the export wrote nothing; {where}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    main()
