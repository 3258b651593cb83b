"""Checkpoint -> PyTorch mirror -> CoreML; reference MIL executor; parity probes; ANE lint.

Modules (one job each; export may import mlx_student, never the reverse):
  mirror       the student re-materialized from its safetensors as static-shape torch modules
  convert      one mlprogram per enumerated function, merged into a multifunction .mlpackage
  compress     int8 / int4 block-wise / LUT palettized weights (coremltools.optimize.coreml)
  audit        fp16 headroom audit of the fp32 mirror on a calibration batch
  parity       mirror vs mlx-lm (fp32, KVCache), for the manifest
  onnx_export  the same mirror as ONNX with explicit KV inputs/outputs, checked by onnxruntime
  cli          mlx_student.export: all of the above plus export_manifest.json
  mil_executor reference MIL executor (numpy, fp16 emulation, states, constexpr weights)
  mil_ops      numpy semantics of the MIL ops
  ane_lint     static ANE placement lint (+ MLComputePlan on macOS)
  taps         the probe's three backends (MLX layer by layer, mirror, MIL dataflow tap map)
  probe        mlx_student.probe: gated MLX / mirror / CoreML parity report (JSON, Markdown, PNG)
"""

import logging
import re
import sys

# What `import coremltools` logs on Linux, where its native CoreML bindings (libcoremlpython) do
# not exist and sklearn / torch are newer than it was tested with: ~10 lines a user reads as a
# broken install. Dropped here, before any module of this package imports coremltools; every
# other coremltools message (conversion warnings, a missing proxy for another reason) is kept.
LINUX_IMPORT_NOISE = re.compile(
    r"Failed to load _ML\w+Proxy: No module named 'coremltools\.libcoremlpython'$"
    r"|scikit-learn version \S+ is not supported\. "
    r"|Torch version \S+ has not been tested with coremltools\. ")

if sys.platform != "darwin":
    logging.getLogger("coremltools").addFilter(
        lambda record: not LINUX_IMPORT_NOISE.match(record.getMessage()))
