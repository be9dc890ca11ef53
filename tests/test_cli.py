"""The command line: clear one-line errors (exit 2), never tracebacks, and a
working compress on a tiny local model."""
import json

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from come_fast.cli import main
from tiny import tiny_model, tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from safetensors.torch import save_file

    p = tmp_path_factory.mktemp("calib") / "c.safetensors"
    save_file({"input_ids": tokens(n=8, T=32)}, str(p))  # enough rows for the default mode's refit
    return p


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = [l for l in out.err.replace("\r", "\n").splitlines() if l.strip()]
    return code, out.out, (lines[-1] if lines else "")


def test_compress_tiny_model(capsys, tiny_dir, calib_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    assert "6 -> 4 layers" in out and "removed" in out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert m.config.num_hidden_layers == 4
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    assert sum("pair" in st for st in meta["report"]) == 2 and meta["layers_after"] == 4
    assert "compensation" in meta["report"][-1]
    # an existing output folder is refused unless --overwrite
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--out", tmp_path / "o", "--quiet")
    assert code == 2 and err.startswith("error:") and "exists" in err
    code, *_ = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                   "--out", tmp_path / "o", "--quiet", "--overwrite")
    assert code == 0


@pytest.mark.parametrize("args, words", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--ratio", "0.97"], "not reachable"),
    (["--target-layers", "9"], "target_layers"),
])
def test_bad_ratios(capsys, tiny_dir, calib_file, tmp_path, args, words):
    code, out, err = run(capsys, "compress", "--model", tiny_dir, *args, "--calib", calib_file, "--out", tmp_path / "x")
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_models_and_calibration(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "compress", "--model", tmp_path / "nowhere", "--ratio", 0.2, "--out", tmp_path / "x")
    assert code == 2 and "does not exist" in err
    g = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(g)
    code, _, err = run(capsys, "compress", "--model", g, "--ratio", 0.2, "--out", tmp_path / "x")
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "llama" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", empty,
                       "--out", tmp_path / "x")
    assert code == 2 and "calibration" in err
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib",
                       tmp_path / "missing.jsonl", "--out", tmp_path / "x")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", empty,
                       "--method", "nope", "--out", tmp_path / "x")
    assert code == 2 and "unknown method" in err


def test_compress_with_distillation(capsys, tiny_dir, calib_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--distill-steps", 3, "--distill-lr", 1e-3, "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "come_fast.json").read_text())
    assert [k for st in meta["report"] for k in ("compensation", "distillation") if k in st] == \
        ["compensation", "distillation"] and meta["report"][-1]["distillation"]["steps"] == 3
    assert meta["settings"]["distill"]["lr"] == 1e-3
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                       "--distill-steps", -2, "--out", tmp_path / "e", "--quiet")
    assert code == 2 and "distill_steps" in err and not (tmp_path / "e").exists()


def test_compress_method_options(capsys, tiny_dir, calib_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--option", "pair_tokens=all", "--option", "last_boundary=raw", "--out", tmp_path / "o",
                         "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    assert meta["settings"]["pair_tokens"] == "all" and meta["settings"]["last_boundary"] == "raw"
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--method", "sleb", "--option", "score_rows=2", "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "come_fast.json").read_text())["settings"]["score_rows"] == 2
    for bad, words in (("score_row=2", "unknown option(s) score_row for method 'sleb'"), ("score_rows", "KEY=VALUE")):
        code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                           "--method", "sleb", "--option", bad, "--out", tmp_path / "b", "--quiet")
        assert code == 2 and words in err and not (tmp_path / "b").exists()
