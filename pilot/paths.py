"""Where the pilot's stages put their outputs: shared by the stages (run.py) and the report."""

import hashlib
import json
from pathlib import Path


def kd_dir(s: dict) -> Path:
    """data/kd_<name>-<hash of the kd_mix settings but its size and batch>: another mix never
    resumes into this one; a larger num_records adds to it."""
    mix = {k: v for k, v in s["kd_mix"].items() if k not in ("num_records", "batch_size")}
    tag = hashlib.sha256(json.dumps(mix, sort_keys=True).encode()).hexdigest()[:8]
    return Path(s["kd_mix"].get("out") or f"data/kd_{s['name']}-{tag}")


def package_dir(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / "export" / fmt


def probe_dir(run_dir: Path, fmt: str) -> Path:
    """Beside the package folder, not in it: the package is the probe stage's input."""
    return Path(run_dir) / "probe" / fmt


def scored_dir(s: dict) -> Path:
    """The natural text scored by the teacher (mlx_student.score's output folder)."""
    return Path(f"data/scored_{s['name']}")


def train_data_dir(s: dict) -> Path:
    """The arms' data folder: scored natural text and the teacher's completions together."""
    return Path(f"data/train_{s['name']}")
