"""`import coremltools` on Linux logs ~10 lines about missing native bindings and untested
sklearn / torch versions; importing the export package drops exactly those and keeps the rest."""

import subprocess
import sys

import pytest

NOISE = ("Failed to load _MLModelProxy", "scikit-learn version", "Torch version")


@pytest.mark.skipif(sys.platform == "darwin", reason="the noise is Linux's (no libcoremlpython)")
def test_export_imports_coremltools_quietly_and_keeps_other_warnings():
    code = ("import logging\n"
            "import export.ane_lint, export.mil_executor  # the package first, as every CLI does\n"
            "import coremltools.models.compute_plan\n"
            "logging.getLogger('coremltools').warning('Failed to load _MLModelProxy: disk on fire')\n"
            "logging.getLogger('coremltools').warning('a conversion warning')\n")
    bare = subprocess.run([sys.executable, "-c", "import coremltools.models.compute_plan"],
                          capture_output=True, text=True, check=True).stderr
    assert all(n in bare for n in NOISE)  # what there is to silence, on this machine
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert err.splitlines() == ["Failed to load _MLModelProxy: disk on fire", "a conversion warning"]
