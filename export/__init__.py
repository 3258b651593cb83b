"""Checkpoint -> PyTorch mirror -> CoreML; reference MIL executor; parity probes; ANE lint."""
