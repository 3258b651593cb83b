"""The export manifest reads each weight's storage back from the saved package's MIL program
(export/compress.py read_storage): real coremltools conversions and compressions of a tiny
student, saved and re-read from disk; an export whose package differs from the request fails
(exit 1, nothing written) unless --allow-partial, and then says what is stored and why."""

import json

import pytest

pytest.importorskip("coremltools")

from conftest import save_tiny  # noqa: E402

from export import cli  # noqa: E402
from export.compress import Compression, compress, read_storage  # noqa: E402
from export.convert import save_multifunction  # noqa: E402

DECODE = "decode_ctx128"
PROJECTIONS = 2 * 7  # the tiny student: 2 layers x q, k, v, o, gate, up, down
ROWS = {128, 64, 256}  # output channels of its projections (q/o/down, k/v, gate/up)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("storage") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def decode(tiny_coreml):
    """The shared fp16 conversion of the tiny student's decode_ctx128 (conftest)."""
    return tiny_coreml[0][DECODE]


def saved(decode, comp, path):
    return save_multifunction({DECODE: compress(decode, comp)}, path, DECODE)


def test_each_format_is_read_from_the_saved_program(decode, tmp_path):
    comp = Compression(weights="lut4", embedding="int8", lut_group_size=16)
    got = read_storage(saved(decode, comp, tmp_path / "a.mlpackage"), comp, tied=True)
    assert (got["weights"], got["embedding"], got["lm_head"]) == ("lut4", "int8", "int8")
    assert got["storage"] == {"weights": {"lut4": PROJECTIONS}, "embedding": {"int8": 3}}
    assert got["differs"] == []
    comp = Compression(weights="int4", embedding="fp16", block_size=32)
    got = read_storage(saved(decode, comp, tmp_path / "b.mlpackage"), comp, tied=True)
    assert got["storage"] == {"weights": {"int4": PROJECTIONS}, "embedding": {"fp16": 3}}
    assert got["differs"] == []


def test_skipped_weights_and_an_ignored_lm_head_are_listed_with_the_reason(decode, tmp_path):
    comp = Compression(weights="lut4", embedding="int8", lm_head="int4", lut_group_size=48)
    got = read_storage(saved(decode, comp, tmp_path / "c.mlpackage"), comp, tied=True)
    assert got["weights"] == "fp16" and got["storage"]["weights"] == {"fp16": PROJECTIONS}
    skipped = [d for d in got["differs"] if d["role"] == "weights"]
    assert sum(len(d["weights"]) for d in skipped) == PROJECTIONS
    assert {d["reason"] for d in skipped} == {
        f"lut_group_size 48 does not divide its {n} output channels" for n in ROWS}
    assert all(d["requested"] == "lut4" and d["stored"] == "fp16" for d in skipped)
    head = [d for d in got["differs"] if d["role"] == "lm_head"]
    assert head == [{"role": "lm_head", "weights": [], "requested": "int4", "stored": "int8",
                     "reason": "the model is tied: its LM head is the embedding's constants "
                               "(compression.embedding int8)"}]


def test_cli_fails_on_a_partial_export_unless_allowed(student, tmp_path, capsys):
    argv = ["--model", str(student), "--out", str(tmp_path / "art"), "--weights", "lut4",
            "--lut-group-size", "48", "--embedding", "int8", "--contexts", "128",
            "--prefill-lengths", "16", "--no-parity", "--calibration-tokens", "32"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "the package differs from the request" in err
    assert "weights: 4 weight(s) stored fp16, requested lut4: lut_group_size 48 does not " \
           "divide its 64 output channels" in err and "--allow-partial" in err
    assert not (tmp_path / "art").exists()  # nothing written

    cli.main(argv + ["--allow-partial"])
    manifest = json.loads((tmp_path / "art" / "export_manifest.json").read_text())
    comp = manifest["compression"]
    assert comp["weights"] == "fp16" and comp["requested"]["weights"] == "lut4"
    assert comp["embedding"] == comp["lm_head"] == "int8"
    assert sum(len(d["weights"]) for d in comp["differs"]) == PROJECTIONS
    assert "WARNING: the package differs from the request" in capsys.readouterr().err
