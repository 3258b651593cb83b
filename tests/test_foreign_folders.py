"""A model folder mlx-lm cannot build (transformers 5's GPT-2: mlx-lm's gpt2 needs `n_ctx`,
which transformers 5 no longer writes) is refused by every loader with one message naming the
file and the key (mlx_student.hf_config.check_mlx_model), never a TypeError from mlx_lm."""

import shutil

import pytest
from conftest import ROOT, save_tiny

from mlx_student import hf_config
from mlx_student.teacher import kd_mix, score
from runtime import server
from runtime.generate import MLXEngine


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                               vocab_size=len(tokenizer))).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models/smollm2-135m-instruct" / f, path / f)
    return path


def message(path):
    return f"{path / 'config.json'}: model_type 'gpt2': mlx-lm's gpt2 model needs n_ctx, which the file lacks"


def test_loader_and_engine_refuse_naming_file_and_key(gpt2):
    for load in (hf_config.load, MLXEngine.load):
        with pytest.raises(hf_config.FolderConfigError) as e:
            load(gpt2)
        assert str(e.value) == message(gpt2)


def test_a_model_type_mlx_lm_lacks_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not_a_model"}')
    with pytest.raises(hf_config.FolderConfigError, match=r"config.json: model_type 'not_a_model': "
                       r"not a model mlx-lm has \(mlx_lm.models\)$"):
        hf_config.load(tmp_path)


@pytest.mark.parametrize("cli", ["score", "kd_mix"])
def test_teacher_clis_refuse_in_one_line(cli, gpt2, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"text": "def f(x):\\n    return x\\n"}\n')
    argv = {"score": [score.main, "--data", str(tmp_path / "d")],
            "kd_mix": [kd_mix.main, "--teacher", "local", "--num-records", "1"]}[cli]
    with pytest.raises(SystemExit) as e:
        argv[0](argv[1:] + ["--model", str(gpt2), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message(gpt2)}\n"
    assert not any((tmp_path / "out").glob("*"))  # nothing written (kd_mix makes the folder)


def test_serve_refuses_model_and_draft_model(gpt2, tmp_path, tokenizer, capsys):
    tiny = save_tiny(tmp_path / "tiny", tokenizer, seed=0)
    for argv, flag in (([], "--model"), (["--model", str(tiny)], "--draft-model")):
        with pytest.raises(SystemExit) as e:
            server.main(argv + [flag, str(gpt2)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.endswith(f"error: {flag} {gpt2}: {message(gpt2)}\n")
