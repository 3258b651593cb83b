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
