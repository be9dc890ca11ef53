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


# -- issue 13: the GPU from the CLI, every option explained, a sample at the end --------

def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_option_has_help_text():
    import argparse

    from come_fast.cli import build_parser

    seen = 0
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, \
                (name, action.option_strings)
    assert seen > 50  # compress, eval and bench quality were all walked


def test_method_help_lists_the_registry(capsys):
    from come_fast import methods

    with pytest.raises(SystemExit) as e:
        main(["compress", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    names = methods.available()
    assert len(names) >= 10 and f"one of: {', '.join(names)} (default: come)" in text
    for flag in ("--device", "--dtype", "--no-sample", "--text-column", "--calib-config", "--calib-split"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--device", "--dtype", "--threads", "--batch-size"):
        assert flag in text


def test_resolve_device(monkeypatch):
    import torch

    from come_fast.cli import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="there are 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_cuda_without_cuda_is_one_line_before_anything_loads(capsys, monkeypatch, tmp_path, cmd):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the model does not exist either: the device is refused first
    extra = ["--ratio", "0.3", "--out", tmp_path / "o"] if cmd == "compress" else []
    code, out, err = run(capsys, cmd, "--model", tmp_path / "nowhere", "--device", "cuda", *extra)
    assert code == 2 and err.startswith("error: --device cuda: CUDA is not available") and "Traceback" not in err
    assert "use --device cpu" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", ["compress", "eval"])
@pytest.mark.parametrize("args, words", [(["--dtype", "float64"], "invalid choice: 'float64'"),
                                         (["--device", "tpu"], "invalid device 'tpu'")])
def test_bad_dtype_or_device_is_an_argparse_error(capsys, tmp_path, cmd, args, words):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--model", str(tmp_path), "--ratio", "0.3", "--out", str(tmp_path / "o"), *args]
             if cmd == "compress" else [cmd, "--model", str(tmp_path), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_compress_bfloat16_on_cpu(capsys, tiny_dir, calib_file, tmp_path):
    from safetensors import safe_open

    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    assert "bfloat16 on cpu" in out and "6 -> 4 layers" in out
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


def test_compress_hub_flags_need_a_hub_id(capsys, tiny_dir, calib_file, tmp_path):
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                       "--calib-split", "validation", "--out", tmp_path / "o")
    assert code == 2 and "--calib-config and --calib-split choose a hub dataset" in err


def test_compress_hub_flags_reach_load_dataset(capsys, monkeypatch, tmp_path):
    """--calib ID --calib-config C --calib-split S --text-column K: streamed from
    datasets.load_dataset (replaced here: no hub) and tokenized."""
    datasets = pytest.importorskip("datasets")
    d = _folder_with_tokenizer(tmp_path)
    calls = []
    docs = [" ".join(VOCAB_WORDS[(5 * i + j) % len(VOCAB_WORDS)] for j in range(7)) for i in range(200)]

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return datasets.IterableDataset.from_generator(lambda: ({"content": t} for t in docs))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    code, out, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", "someone/corpus",
                         "--calib-config", "en", "--calib-split", "validation", "--text-column", "content",
                         "--n-samples", 8, "--seq-len", 32, "--method", "shortgpt", "--out", tmp_path / "o",
                         "--quiet")
    assert code == 0, err
    assert calls == [("someone/corpus", "en", {"split": "validation", "streaming": True})]
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    assert meta["settings"]["calibration"] == [8, 32]


VOCAB_WORDS = ["The", "capital", "of", "France", "is"] + [f"w{i}" for i in range(121)]


def _word_tokenizer():
    """Word-level, 128 ids (the tiny models' vocabulary): every id decodes to a word."""
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(VOCAB_WORDS)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def _folder_with_tokenizer(tmp_path, **kw):
    d = tmp_path / "with_tok"
    if not d.exists():
        tiny_model("llama", **kw).save_pretrained(d)
        _word_tokenizer().save_pretrained(d)
    return d


def _greedy(model, tok, prompt, n):
    """An independent greedy decode: full forward each step, argmax, stop at EOS."""
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_compress_prints_a_greedy_sample(capsys, calib_file, tmp_path):
    from transformers import AutoTokenizer

    from come_fast.cli import SAMPLE_PROMPT

    d = _folder_with_tokenizer(tmp_path)
    code, out, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", calib_file,
                         "--out", tmp_path / "o")
    assert code == 0, err
    line = [l for l in out.splitlines() if l.startswith("sample (greedy, up to 20 tokens): ")]
    assert len(line) == 1, out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    want = _greedy(m, tok, SAMPLE_PROMPT, 20)
    assert want.strip()  # the reference is not empty: there is something to compare
    assert line[0].endswith(f'"The capital of France is" -> {json.dumps(want)}')
    # the dense model continues differently: the sample is the compressed model's
    dense = AutoModelForCausalLM.from_pretrained(d)
    assert _greedy(dense, tok, SAMPLE_PROMPT, 20) != want
    for flag in ("--quiet", "--no-sample"):
        code, out, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", calib_file,
                             "--out", tmp_path / "o", "--overwrite", flag)
        assert code == 0 and "sample" not in out, (flag, out)


def test_compress_without_a_tokenizer_prints_no_sample(capsys, tiny_dir, calib_file, tmp_path):
    code, out, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                         "--out", tmp_path / "o")
    assert code == 0, err
    assert "saved to" in out and "sample" not in out


def test_eval_device_dtype_threads_batch_size(capsys, monkeypatch, tmp_path):
    """eval --batch-size 3 gives the perplexity of an independent per-window
    computation; --dtype/--device reach the loader; --threads sets torch's."""
    import math

    import torch
    import torch.nn.functional as F

    from come_fast import api

    d = _folder_with_tokenizer(tmp_path)
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    words = [VOCAB_WORDS[(i * 37 + i // 11) % len(VOCAB_WORDS)] for i in range(40 * 512 + 50)]
    (data / "wikitext2" / "test.txt").write_text(" ".join(words))
    loads = []
    real_load = api.load

    def spy(path, **kw):
        loads.append(kw)
        return real_load(path, **kw)

    monkeypatch.setattr(api, "load", spy)
    threads = torch.get_num_threads()
    try:
        code, out, err = run(capsys, "eval", "--model", d, "--tasks", "wikitext2", "--data-dir", data,
                             "--device", "cpu", "--dtype", "float32", "--threads", 1, "--batch-size", 3,
                             "--out", tmp_path / "r.json", "--quiet")
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert loads == [{"dtype": torch.float32, "device": "cpu"}]
    got = json.loads((tmp_path / "r.json").read_text())[str(d)]["tasks"]["wikitext2"]
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.tensor([VOCAB_WORDS.index(w) + 2 for w in words])
    with torch.inference_mode():
        nll = [float(F.cross_entropy(model(ids[None, s:s + 512]).logits[0, :-1], ids[s + 1:s + 512]))
               for s in range(0, 40 * 512, 512)]
    assert got["windows"] == 40 and got["ppl"] == pytest.approx(math.exp(sum(nll) / 40), rel=1e-5)
    code, _, err = run(capsys, "eval", "--model", d, "--tasks", "wikitext2", "--data-dir", data,
                       "--batch-size", 0)
    assert code == 2 and "--batch-size must be a positive integer" in err


def test_cli_dtypes_are_the_apis():
    """--dtype's choices are spelled out in cli.py (parsing does not import
    torch); they must stay the ones compress(dtype=) accepts, in both directions."""
    from come_fast import api, cli

    assert tuple(cli.DTYPES) == tuple(api.DTYPES)
    for name in cli.DTYPES:
        assert cli._torch_dtype(name) is api.DTYPES[name]
