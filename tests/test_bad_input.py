"""Issue 12: bad input gives one clear error (``error: ...``, exit 2 on the
command line), never a traceback, and nothing silently wrong comes back:
trained paths that end in NaN, checkpoints whose weights do not match their
config (FinerCut's sublayer checkpoints included), sliding-window layer kinds,
silent clamps of options and sizes. Tiny random models only."""
import copy
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import come_fast
from come_fast import layerops, methods
from come_fast.adapters import adapter_for, count_parameters, renumber
from come_fast.calibration import CalibrationError, calibration_tokens
from come_fast.checkpoint import read_meta
from come_fast.cli import main
from come_fast.models import CheckpointError, load_model
from tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ---------------------------------------------------------------------------------

def run(capsys, *argv):
    """``come-fast ARGV`` in-process: (exit code, stdout, last stderr line)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = [l for l in out.err.replace("\r", "\n").splitlines() if l.strip()]
    return code, out.out, (lines[-1] if lines else "")


def assert_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


WORDS = [f"w{i}" for i in range(100)]


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def text(n=2000):
    return " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(n))


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


@pytest.fixture(scope="module")
def finercut_dir(tmp_path_factory):
    """A FinerCut result (one MLP sublayer removed) saved with a tokenizer:
    (folder, the in-memory model, its parameter count)."""
    m = tiny_model("llama")
    res = come_fast.compress(m, target_layers=5, method="finercut", calib=tokens(n=2, T=8))
    assert res.settings["sublayers"] is not None  # sublayers, not whole layers, were removed
    d = tmp_path_factory.mktemp("fc") / "finercut"
    come_fast.save(res, d, tokenizer=tiny_tokenizer())
    return d, m, count_parameters(m)


def logits(model, ids=None):
    with torch.inference_mode():
        return model(tokens() if ids is None else ids, use_cache=False).logits


def write_wikitext(root):
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext2" / "test.txt").write_text(text(), encoding="utf-8")
    return root


# == Silently wrong results ====================================================================

# -- trained paths end with a finiteness check -------------------------------------------------

@pytest.mark.parametrize("method, options", [("streamline", {}), ("reverse", {"recover": True})])
def test_training_in_float16_is_refused_not_returned_as_nan(method, options):
    m = tiny_model("llama").half()
    with pytest.raises(FloatingPointError, match="NaN or Inf after training in float16.*float32 or bfloat16"):
        come_fast.compress(m, target_layers=4, method=method, calib=tokens(), **options)


@pytest.mark.parametrize("method, options, words", [
    ("streamline", {"streamline_steps": 2}, "lower streamline_lr"),
    ("reverse", {"recover": True, "recover_steps": 2}, "lower recover_lr"),
])
def test_diverged_training_is_refused(monkeypatch, method, options, words):
    """Whatever makes a float32 training diverge, the result is not returned."""
    import come_fast.distill as distill

    real = distill.distill

    def diverging(forward, params, *args, **kwargs):
        params = list(params)
        rep = real(forward, params, *args, **kwargs)
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return rep

    monkeypatch.setattr(f"come_fast.methods.{method}.distill", diverging)
    m = tiny_model("llama")
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(FloatingPointError, match=words):
        come_fast.compress(m, target_layers=4, method=method, calib=tokens(), **options)
    # no NaN is left in the caller's tensors (the layer list itself is compress's to restore)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if k in before)


@pytest.mark.parametrize("method, options, name", [
    ("streamline", {"streamline_lr": 1e6}, "streamline_lr"),
    ("reverse", {"recover": True, "recover_lr": 1e6}, "recover_lr"),
    ("reverse", {"recover": True, "recover_lr": 0}, "recover_lr"),
    ("reverse", {"recover": True, "recover_kl": 0}, "recover_kl and recover_ce are both 0"),
    ("streamline", {"streamline_batch": 0}, "streamline_batch"),
])
def test_training_options_refused_before_any_change(method, options, name):
    m = tiny_model("llama")
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=name):
        come_fast.compress(m, target_layers=4, method=method, calib=tokens(), **options)
    assert len(m.model.layers) == 6
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_cli_reports_a_diverged_training(capsys, monkeypatch, tiny_dir, calib_file, tmp_path):
    def nan_distill(forward, params, *args, **kwargs):
        from come_fast.distill import distill

        params = list(params)
        rep = distill(forward, params, *args, **kwargs)
        with torch.no_grad():
            params[0].fill_(float("inf"))
        return rep

    monkeypatch.setattr("come_fast.methods.streamline.distill", nan_distill)
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--method", "streamline",
                       "--option", "streamline_steps=1", "--calib", calib_file, "--out", tmp_path / "o", "--quiet")
    assert_error(code, err, "NaN or Inf", "streamline_lr")
    assert not (tmp_path / "o").exists()


# -- FinerCut checkpoints: every loading path reads come_fast_sublayers ------------------------

def test_finercut_checkpoint_through_load_model(finercut_dir):
    d, m, n = finercut_dir
    loaded, tok = load_model(d)
    assert count_parameters(loaded) == n  # nothing re-created
    assert torch.equal(logits(loaded), logits(m))
    assert tok is not None
    model, _, meta = come_fast.load(d)
    assert count_parameters(model) == n and meta["method"] == "finercut"


def test_finercut_checkpoint_through_compress_and_evaluate(finercut_dir, tmp_path):
    from come_fast import eval as ev

    d, m, n = finercut_dir
    res = come_fast.compress(str(d), target_layers=5, method="finercut", calib=tokens(n=2, T=8))
    assert res.params_before == n  # the loaded model was the FinerCut result, not a re-grown one
    data = write_wikitext(tmp_path)
    got = come_fast.evaluate(str(d), tasks=["wikitext2"], data_dir=data, ppl_windows=2, ppl_seq_len=16,
                             progress=False)
    want = ev.evaluate(m, tiny_tokenizer(), tasks=["wikitext2"], data_dir=data, ppl_windows=2, ppl_seq_len=16,
                       progress=False)
    assert got["tasks"]["wikitext2"]["ppl"] == pytest.approx(want["tasks"]["wikitext2"]["ppl"], rel=1e-6)


def test_finercut_checkpoint_through_the_cli(capsys, finercut_dir, calib_file, tmp_path):
    d, m, n = finercut_dir
    code, out, err = run(capsys, "compress", "--model", d, "--target-layers", 5, "--method", "finercut",
                         "--calib", calib_file, "--option", "score_rows=1", "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    assert meta["params_before"] == n
    assert count_parameters(load_model(tmp_path / "o")[0]) == meta["params_after"]


# -- weights must match the config ---------------------------------------------------------------

@pytest.fixture()
def three_of_seven(tmp_path):
    """Weights of 3 layers under a config that says 7."""
    d = tmp_path / "three"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 7
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_missing_weights_refused_everywhere(three_of_seven, capsys, tmp_path, calib_file):
    d = three_of_seven
    with pytest.raises(CheckpointError, match=r"36 missing \(e\.g\. model\.layers\.[3-6]\..*refusing"):
        load_model(d)
    with pytest.raises(CheckpointError, match="missing"):
        come_fast.load(d)
    with pytest.raises(CheckpointError, match="missing"):
        come_fast.compress(str(d), target_layers=2, calib=tokens())
    with pytest.raises(CheckpointError, match="missing"):
        come_fast.evaluate(str(d), tasks=["wikitext2"], data_dir=write_wikitext(tmp_path / "data"))
    code, _, err = run(capsys, "compress", "--model", d, "--target-layers", 2, "--calib", calib_file,
                       "--out", tmp_path / "o")
    assert_error(code, err, "weights do not match the config", "missing")
    assert not (tmp_path / "o").exists()


def test_unexpected_weights_refused(tmp_path):
    d = tmp_path / "five"
    tiny_model("llama", num_hidden_layers=5).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(d)


def test_mismatched_shapes_refused(capsys, tmp_path, calib_file):
    d = tmp_path / "mm"
    tiny_model("llama").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the weights hold 96 MLP channels
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shapes of some weights do not match the config"):
        load_model(d)
    code, _, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", calib_file,
                       "--out", tmp_path / "o")
    assert_error(code, err, "do not match the config")


def test_tied_weights_are_not_missing(tmp_path):
    """SmolLM2-like: lm_head tied to the embedding is stored once and loads."""
    m = tiny_model("llama", tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "tied")
    loaded, _ = load_model(tmp_path / "tied")
    assert torch.equal(logits(loaded), logits(m))


# -- sliding-window layer kinds survive renumbering --------------------------------------------

KINDS = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
         "full_attention"]


def sliding_qwen2(family="qwen2"):
    return tiny_model(family, use_sliding_window=True, sliding_window=4, layer_types=list(KINDS))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_deletion_keeps_each_layers_attention_kind(family, tmp_path):
    m = sliding_qwen2(family)
    with torch.no_grad():  # the kinds matter for these inputs: 16 tokens, a window of 4
        full = copy.deepcopy(m)
        full.config.layer_types = ["full_attention"] * 6
        assert not torch.allclose(logits(m), logits(full))
    res = come_fast.compress(m, target_layers=4, method="shortgpt", calib=tokens())
    want = [KINDS[i] for i in res.provenance]
    assert len(set(want)) == 2  # the test keeps layers of both kinds
    assert m.config.layer_types == want
    assert [l.self_attn.layer_type for l in m.model.layers] == want
    # the same as a model built with those kinds from the start
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(m.config)).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(logits(ref), logits(m), rtol=1e-6, atol=1e-6)
    come_fast.save(res, tmp_path / "o")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert back.config.layer_types == want
    torch.testing.assert_close(logits(back), logits(m), rtol=1e-6, atol=1e-6)


def test_renumber_after_a_direct_deletion():
    m = sliding_qwen2()
    m.model.layers = torch.nn.ModuleList([l for i, l in enumerate(m.model.layers) if i not in (0, 3)])
    renumber(adapter_for(m))
    assert m.config.layer_types == [KINDS[i] for i in (1, 2, 4, 5)]


def test_a_layer_without_attention_keeps_its_kind():
    """FinerCut: a layer whose attention is removed carries no kind of its own;
    a deletion elsewhere keeps its entry."""
    from come_fast import sublayers

    m = sliding_qwen2()
    a = adapter_for(m)
    sublayers.remove_sublayer(a.layers[1], "attention", 1)
    layerops.delete(a, None, list(range(6)), [0])
    assert m.config.layer_types == KINDS[1:]


@pytest.mark.parametrize("window, kind", [((1, 2), "sliding_attention"), ((0, 2), "full_attention"),
                                          ((3, 2), "full_attention")])
def test_folded_window_attention_kind(window, kind):
    """A layer standing for layers of one kind keeps it; for unlike kinds it
    becomes full attention (it sees every token any source saw)."""
    m = sliding_qwen2()
    a = adapter_for(m)
    start, count = window
    layerops.fold_window(a, None, list(range(6)), start, count)
    want = KINDS[:start] + [kind] + KINDS[start + count:]
    assert m.config.layer_types == want
    merged = m.model.layers[start].self_attn
    assert merged.layer_type == kind and merged.sliding_window == (4 if kind == "sliding_attention" else None)


def test_streamline_replacement_of_a_mixed_block_is_full_attention():
    m = sliding_qwen2()
    res = come_fast.compress(m, target_layers=5, method="streamline", calib=tokens(), streamline_steps=1)
    block = res.report[0]["block"]
    kinds = {KINDS[i] for i in block}
    want = kinds.pop() if len(kinds) == 1 else "full_attention"
    assert m.config.layer_types[block[0]] == want
    assert m.config.layer_types == KINDS[:block[0]] + [want] + KINDS[block[-1] + 1:]


def test_come_merge_of_unlike_layers_is_full_attention():
    from come_fast.dispatch import Ops
    from come_fast.merge import Selection, concat_merge

    m = sliding_qwen2()
    a = adapter_for(m)
    sel = Selection(kv_a=[0], kv_b=[1], mlp_a=list(range(48)), mlp_b=list(range(48, 96)), q_heads_a=[0, 1],
                    q_heads_b=[2, 3])
    merged = concat_merge(a, a.layers[1], a.layers[3], sel, 0.5, Ops("torch", torch.device("cpu")))
    assert merged.self_attn.layer_type == "full_attention" and merged.self_attn.sliding_window is None


# -- silent clamps ---------------------------------------------------------------------------------

def test_target_layers_true_is_refused():
    with pytest.raises(ValueError, match="target_layers"):
        come_fast.compress(tiny_model("llama"), target_layers=True, method="shortgpt", calib=tokens())


@pytest.mark.parametrize("n, T, name", [(32, 1, "seq_len"), (32, 0, "seq_len"), (0, 16, "n_samples"),
                                        (-1, 16, "n_samples"), (2.5, 16, "n_samples")])
def test_calibration_sizes(n, T, name):
    m = tiny_model("llama")
    with pytest.raises(CalibrationError, match=name):
        calibration_tokens(None, m, None, n_samples=n, seq_len=T)
    with pytest.raises(CalibrationError, match=name):  # before a single token is sampled
        come_fast.compress(m, target_layers=4, method="shortgpt", n_samples=n, seq_len=T)


@pytest.mark.parametrize("method, options, name", [
    ("sleb", {"score_rows": 0}, "score_rows"),
    ("ppl", {"score_rows": -3}, "score_rows"),
    ("finercut", {"score_rows": 1.5}, "score_rows"),
    ("taylor+", {"score_rows": {"a": 1}}, "score_rows"),
    ("magnitude+", {"keep_first": -1}, "keep_first"),
    ("taylor+", {"keep_last": True}, "keep_last"),
    ("shortgpt", {"max_cache_bytes": -1}, "max_cache_bytes"),
    ("sleb", {"max_cache_bytes": "abc"}, "max_cache_bytes"),
    ("laco", {"laco_relax": 0}, "laco_relax"),
    ("laco", {"laco_layers": 1}, "laco_layers"),
    ("slm", {"slm_threshold": float("nan")}, "slm_threshold"),
    ("laco", {"laco_threshold": "high"}, "laco_threshold"),
    ("replaceme", {"replaceme_tokens": "first"}, "replaceme_tokens"),
    ("reverse", {"recover": "yes"}, "recover"),
])
def test_option_values_refused_before_the_run(method, options, name):
    [(key, value)] = options.items()
    with pytest.raises(ValueError, match=f"option {name}=.*for method '{re.escape(method)}': expected"):
        methods.check_options(method, options)
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=name):
        come_fast.compress(m, target_layers=4, method=method, calib=tokens(), **options)
    assert len(m.model.layers) == 6


def test_valid_option_values_pass():
    methods.check_options("sleb", {"score_rows": 2, "max_cache_bytes": 2e9})
    methods.check_options("shortgpt", {"max_cache_bytes": None})
    methods.check_options("reverse", {"recover": True, "recover_lr": 1e-3, "recover_kl": 1, "recover_ce": 0.5})
    methods.check_options("replaceme", {"replaceme_tokens": "last", "replaceme_distance": "angular"})


def test_register_keeps_the_tuple_form():
    @methods.register("_test_tuple_form", options=("alpha",))
    def _fn(ctx, n):
        raise AssertionError

    try:
        assert methods.OPTIONS["_test_tuple_form"] == {"alpha"}
        methods.check_options("_test_tuple_form", {"alpha": object()})  # declared without a validator: any value
        with pytest.raises(ValueError, match="unknown option"):
            methods.check_options("_test_tuple_form", {"beta": 1})
    finally:
        methods.REGISTRY.pop("_test_tuple_form")
        methods.OPTIONS.pop("_test_tuple_form")
        methods.VALIDATORS.pop("_test_tuple_form")


def test_score_rows_zero_is_not_one():
    from come_fast.methods import Context

    ctx = Context(adapter=None, tokens=tokens(), ops=None, options={"score_rows": 0})
    with pytest.raises(ValueError, match="score_rows must be a positive integer"):
        layerops.calibration_slice(ctx)


@pytest.mark.parametrize("value", [2.7, 0, -1, "5"])
def test_grid_steps_values(value):
    with pytest.raises(ValueError, match="grid_steps"):
        methods.check_options("come-p", {"grid_steps": value})


@pytest.mark.parametrize("options", [{"last_boundary": "middle"}, {"pair_tokens": 3}])
def test_come_option_values(options):
    with pytest.raises(ValueError, match="expected one of"):
        methods.check_options("come", options)


def test_eval_limit_and_tasks_api(tmp_path):
    from come_fast import eval as ev

    data = write_wikitext(tmp_path)
    m, tok = tiny_model("llama"), tiny_tokenizer()
    for limit in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            ev.evaluate(m, tok, tasks=["wikitext2"], data_dir=data, limit=limit)
    for windows in (0, -2):
        with pytest.raises(ValueError, match="ppl_windows must be a positive integer"):
            ev.evaluate(m, tok, tasks=["wikitext2"], data_dir=data, ppl_windows=windows, ppl_seq_len=16)
    with pytest.raises(ValueError, match="no task given"):
        ev.evaluate(m, tok, tasks=[], data_dir=data)
    with pytest.raises(ValueError, match="limit must be"):
        ev.load_examples("piqa", data, limit=-1)


@pytest.mark.parametrize("args, words", [
    (["--limit", "-1"], "--limit must be a positive integer"),
    (["--limit", "0"], "--limit must be a positive integer"),
    (["--tasks", ",,,"], "no task given"),
    (["--tasks", "piqa,mmlu"], "unknown task(s) 'mmlu'"),
])
def test_eval_cli_limit_and_tasks(capsys, tiny_dir, tmp_path, args, words):
    code, out, err = run(capsys, "eval", "--model", tiny_dir, "--data-dir", tmp_path, *args, "--quiet")
    assert_error(code, err, words)
    assert "|" not in out  # no table


def test_bench_cli_ppl_windows(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "quality", "--ppl-windows", 0, "--data-dir", tmp_path, "--out", tmp_path / "r")
    assert_error(code, err, "--ppl-windows must be a positive integer")
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        run(capsys, "bench", "quality", "--ppl-windows", "most", "--data-dir", tmp_path, "--out", tmp_path / "r")
    assert e.value.code == 2 and "expected a positive integer or 'all', got 'most'" in capsys.readouterr().err


def test_bench_cli_ppl_windows_all_is_the_whole_test_set():
    from come_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "quality", "--ppl-windows", "all"])
    assert args.ppl_windows is None  # evaluate's "every full window"
    assert build_parser().parse_args(["bench", "quality"]).ppl_windows == 40


# == One clear error, never a traceback ========================================================

@pytest.mark.parametrize("option, words", [
    ("max_cache_bytes=abc", "option max_cache_bytes='abc' for method 'come': expected a non-negative integer"),
    ("max_cache_bytes=-5", "max_cache_bytes=-5"),
    ('score_rows={"a":1}', "option score_rows={'a': 1} for method 'sleb'"),
    ("score_rows=0", "score_rows=0"),
    ("keep_first=-1", "keep_first=-1"),
])
def test_cli_option_values(capsys, tiny_dir, calib_file, tmp_path, option, words):
    method = {"score_rows": "sleb", "keep_first": "magnitude+"}.get(option.split("=")[0], "come")
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--method", method,
                       "--option", option, "--calib", calib_file, "--out", tmp_path / "o")
    assert_error(code, err, words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["grid_steps=0", "grid_steps=-1", "grid_steps=2.7"])
def test_cli_grid_steps(capsys, tiny_dir, calib_file, tmp_path, option):
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--method", "come-p",
                       "--option", option, "--calib", calib_file, "--out", tmp_path / "o")
    assert_error(code, err, "grid_steps")


@pytest.mark.parametrize("args, words", [
    (["--seq-len", "0"], "--seq-len must be at least 2"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--n-samples", "0"], "--n-samples must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--distill-lr", "1e6"], "--distill-lr must be a number in (0, 1]"),
    (["--distill-lr", "nan"], "--distill-lr"),
    (["--threads", "0"], "--threads"),
])
def test_cli_sizes(capsys, tiny_dir, calib_file, tmp_path, args, words):
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, *args,
                       "--calib", calib_file, "--out", tmp_path / "o")
    assert_error(code, err, words)


@pytest.mark.parametrize("kwargs, name", [({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"),
                                          ({"distill_steps": 1, "distill_lr": 1e6}, "distill_lr"),
                                          ({"rounding": "sideways"}, "rounding")])
def test_api_sizes(kwargs, name):
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=name):
        come_fast.compress(m, ratio=0.3 if "rounding" in kwargs else None,
                           target_layers=None if "rounding" in kwargs else 4, calib=tokens(), **kwargs)


def test_meta_device_model():
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(tiny_model("llama").config)
    with pytest.raises(ValueError, match="meta"):
        come_fast.compress(m, target_layers=4, calib=tokens())


def test_whole_layer_method_on_a_finercut_model(finercut_dir):
    d, _, _ = finercut_dir
    with pytest.raises(ValueError, match="sublayer"):
        come_fast.compress(str(d), target_layers=3, method="shortgpt", calib=tokens())


def _calib_files(tmp_path):
    files = {}
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(os.urandom(64))
    files["corrupt.safetensors"] = (p, "not a readable safetensors file")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "w1 w2"}\n{"text": "w3\n')
    files["bad.jsonl"] = (p, "line 2: invalid JSON")
    p = tmp_path / "null.jsonl"
    p.write_text('{"text": "w1 w2"}\n\n{"text": null}\n')
    files["null.jsonl"] = (p, "line 3: 'text' must be a string, got null")
    p = tmp_path / "int.jsonl"
    p.write_text('{"text": 5}\n{"text": 7}\n')
    files["int.jsonl"] = (p, "line 1: 'text' must be a string, got int 5")
    p = tmp_path / "notext.jsonl"
    p.write_text('{"body": "w1"}\n')
    files["notext.jsonl"] = (p, "line 1: no 'text' field")
    p = tmp_path / "random.txt"
    p.write_bytes(bytes([0xff, 0xfe, 0x80]) + os.urandom(500))
    files["random.txt"] = (p, "is not UTF-8 text")
    return files


@pytest.mark.parametrize("name", ["corrupt.safetensors", "bad.jsonl", "null.jsonl", "int.jsonl", "notext.jsonl",
                                  "random.txt"])
def test_bad_calibration_files(capsys, tiny_dir, tmp_path, name):
    path, words = _calib_files(tmp_path)[name]
    with pytest.raises(CalibrationError, match=re.escape(words)):
        calibration_tokens(path, tiny_model("llama"), tiny_tokenizer(), n_samples=2, seq_len=8)
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", path,
                       "--out", tmp_path / "o")
    assert_error(code, err, words, str(path))


def test_good_text_calibration_still_reads(tmp_path):
    p = tmp_path / "good.jsonl"
    p.write_text("".join(json.dumps({"text": text(40)}) + "\n" for _ in range(3)))
    ids = calibration_tokens(p, tiny_model("llama"), tiny_tokenizer(), n_samples=2, seq_len=8)
    assert ids.shape == (2, 8) and int(ids.max()) < 128
    q = tmp_path / "good.txt"
    q.write_text(text(40))
    assert calibration_tokens(q, tiny_model("llama"), tiny_tokenizer(), n_samples=2, seq_len=8).shape == (2, 8)


def test_eval_without_a_tokenizer(capsys, tiny_dir, tmp_path):
    data = write_wikitext(tmp_path)
    code, _, err = run(capsys, "eval", "--model", tiny_dir, "--tasks", "wikitext2", "--data-dir", data, "--quiet")
    assert_error(code, err, "tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        come_fast.evaluate(str(tiny_dir), tasks=["wikitext2"], data_dir=data)


def test_full_disk_during_save(capsys, monkeypatch, tiny_dir, calib_file, tmp_path):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # what a full disk leaves: a partial file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    code, _, err = run(capsys, "compress", "--model", tiny_dir, "--target-layers", 4, "--calib", calib_file,
                       "--out", tmp_path / "o", "--quiet")
    assert_error(code, err, "no space left on the device")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left


def test_truncated_safetensors(capsys, tmp_path, calib_file):
    d = tmp_path / "trunc"
    tiny_model("llama").save_pretrained(d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(d)
    code, _, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", calib_file,
                       "--out", tmp_path / "o")
    assert_error(code, err, "could not read the weights", "truncated or corrupt")


def test_pickle_only_checkpoint_refused(capsys, tmp_path, calib_file):
    d = tmp_path / "pkl"
    m = tiny_model("llama")
    m.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(d)
    with pytest.raises(CheckpointError, match="safetensors only"):
        come_fast.load(d)
    code, _, err = run(capsys, "compress", "--model", d, "--target-layers", 4, "--calib", calib_file,
                       "--out", tmp_path / "o")
    assert_error(code, err, "pytorch_model.bin", "safetensors only")


@pytest.mark.parametrize("garbage", ["garbage", ["attention"], {"attention": "x"}, {"attention": [99]},
                                     {"attention": [1, 1]}, {"mlp": [True]}, {"heads": [0]}, {"mlp": [-1]}])
def test_garbage_sublayer_spec(capsys, finercut_dir, tmp_path, garbage):
    import shutil

    d = tmp_path / "fc"
    shutil.copytree(finercut_dir[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["come_fast_sublayers"] = garbage
    (d / "config.json").write_text(json.dumps(cfg))
    for load in (load_model, come_fast.load):
        with pytest.raises(CheckpointError, match="come_fast_sublayers"):
            load(d)
    code, _, err = run(capsys, "eval", "--model", d, "--data-dir", tmp_path, "--tasks", "wikitext2")
    assert_error(code, err, "malformed come_fast_sublayers")


def test_sublayer_spec_that_does_not_fit_the_weights(finercut_dir, tmp_path):
    import shutil

    d = tmp_path / "fc"
    shutil.copytree(finercut_dir[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["come_fast_sublayers"]["attention"] = [0]  # well-formed, but layer 0's attention weights are stored
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"come_fast_sublayers skeleton.*1 unexpected|unexpected"):
        load_model(d)


def test_corrupt_come_fast_json(capsys, finercut_dir, tmp_path):
    import shutil

    d = tmp_path / "fc"
    shutil.copytree(finercut_dir[0], d)
    (d / "come_fast.json").write_text('{"method": "finercut", ')
    with pytest.raises(CheckpointError, match="come_fast.json is not valid JSON"):
        read_meta(d)
    with pytest.raises(CheckpointError, match="come_fast.json"):
        come_fast.load(d)
    assert load_model(d)[0] is not None  # the model itself loads: only its record is bad
    code, _, err = run(capsys, "eval", "--model", d, "--data-dir", write_wikitext(tmp_path / "data"),
                       "--tasks", "wikitext2")
    assert_error(code, err, "come_fast.json")


def test_corrupt_config_json(tmp_path):
    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    (d / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(d)


def test_unsupported_architecture_from_config_before_weights(capsys, tmp_path, calib_file):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(GPT2Config(n_layer=2, n_embd=32, n_head=2).to_json_string())
    (d / "model.safetensors").write_bytes(b"not weights at all")  # never read
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama"):
        load_model(d)
    code, _, err = run(capsys, "compress", "--model", d, "--ratio", 0.2, "--calib", calib_file, "--out",
                       tmp_path / "o")
    assert_error(code, err, "unsupported architecture 'gpt2'")
