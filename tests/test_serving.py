"""``come-fast bench serving`` (come_fast.serving) on tiny saved models, tiny sizes:
the JSON's structure and that every figure counts the tokens asked for."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

import come_fast
from come_fast import runtime, serving
from come_fast.cli import main
from tiny import tiny_model, tokens

HAS_EXT = runtime.EXTENSION_AVAILABLE and "cpu" in runtime.extension_devices()

# tiny sizes: prefill batches 1, 2 of 8 tokens; decode batches 1, 3 of 5 new tokens after a 4-token prompt
ARGS = ["--threads", "1", "--runs", "3", "--warmup", "0", "--prefill-batches", "1,2", "--prefill-len", "8",
        "--decode-batches", "1,3", "--new-tokens", "5", "--prompt-len", "4", "--quiet"]
NAMES = ["prefill 1x8", "prefill 2x8", "decode b1 x5", "decode b3 x5"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The dense tiny Llama (a plain HF folder) and a ShortGPT-compressed copy saved by come_fast.save."""
    root = tmp_path_factory.mktemp("serving")
    dense = root / "dense"
    tiny_model("llama").save_pretrained(dense)
    res = come_fast.compress(tiny_model("llama"), target_layers=4, method="shortgpt", calib=tokens())
    come_fast.save(res, root / "short4")
    return dense, root / "short4"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = [l for l in out.err.replace("\r", "\n").splitlines() if l.strip()]
    return code, out.out, (lines[-1] if lines else "")


def _non_embedding(model) -> int:
    inner = model.model
    return sum(p.numel() for p in inner.layers.parameters()) + sum(p.numel() for p in inner.norm.parameters())


def test_cli_json_structure_and_token_counts(capsys, dirs, tmp_path):
    dense, short = dirs
    out = tmp_path / "res" / "serving.json"
    code, text, err = _run(capsys, "bench", "serving", "--model", short, "--baseline", dense, *ARGS, "--out", out)
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() == text[:text.index("wrote")].strip()

    s = rec["settings"]
    assert s["threads"] == 1 and s["runs"] == 3 and s["warmup"] == 0 and s["dtype"] == "float32"
    assert [w["name"] for w in s["workloads"]] == NAMES
    assert s["extension"]["available"] == runtime.EXTENSION_AVAILABLE
    assert rec["baseline"] == "dense"
    assert list(rec["models"]) == ["dense", "short4"]

    variants = ["plain", "optimized"] if HAS_EXT else ["plain"]
    for label, layers in (("dense", 6), ("short4", 4)):
        m = rec["models"][label]
        assert m["layers"] == layers and m["mlp_widths"] == [96]
        assert m["fused_mlps"] == (layers if HAS_EXT else 0)
        assert (m["variants"]["optimized"] is None) == (not HAS_EXT)
        for v in variants:
            row = m["variants"][v]
            assert list(row) == NAMES
            for name in NAMES:
                r = row[name]
                assert len(r["seconds"]) == r["runs"] == 3 and all(t > 0 for t in r["seconds"])
                assert r["median_s"] == statistics.median(r["seconds"])
                assert r["tok_s"] == pytest.approx(r["tokens"] / r["median_s"])
            assert [row[n]["tokens"] for n in NAMES[:2]] == [8, 16]  # batch x prefill length
            for name, batch in (("decode b1 x5", 1), ("decode b3 x5", 3)):
                r = row[name]
                assert r["batch"] == batch and r["prompt_len"] == 4 and r["new_tokens"] == 5
                # what generate really returned and streamed, every run
                assert r["generated_per_run"] == [5, 5, 5] and r["steps_per_run"] == [5, 5, 5]
                assert r["tokens"] == batch * 4  # the timed steps: after the first token
                assert all(tot > dec for tot, dec in zip(r["total_s"], r["seconds"]))
                assert r["e2e_tok_s"] == pytest.approx(batch * 5 / statistics.median(r["total_s"]))

    # ideal speed-ups from the models themselves
    dm, _, _ = come_fast.load(dense)
    sm, _, meta = come_fast.load(short)
    assert meta["method"] == "shortgpt" and rec["models"]["short4"]["method"] == "shortgpt"
    head = dm.lm_head.weight.numel()
    assert rec["models"]["short4"]["params"]["non_embedding"] == _non_embedding(sm)
    assert rec["models"]["short4"]["params"]["lm_head"] == head
    sp = rec["models"]["short4"]["speedup"]
    assert "speedup" not in rec["models"]["dense"]
    for v in variants:
        for name in NAMES:
            ideal = _non_embedding(dm) / _non_embedding(sm) if name.startswith("prefill") else \
                (_non_embedding(dm) + head) / (_non_embedding(sm) + head)
            assert sp[v][name]["ideal"] == pytest.approx(ideal)
            base = rec["models"]["dense"]["variants"][v][name]["tok_s"]
            assert sp[v][name]["measured"] == pytest.approx(rec["models"]["short4"]["variants"][v][name]["tok_s"] / base)
    assert sp["plain"]["prefill 1x8"]["ideal"] == pytest.approx(1.5, rel=0.02)  # 6 -> 4 layers, norms aside
    # the table names both models and every workload
    for word in ["dense", "short4", *NAMES, "measured (ideal)"]:
        assert word in text


def test_models_left_plain_and_extension_absent(dirs, monkeypatch):
    dense, _ = dirs
    monkeypatch.setattr(runtime, "EXTENSION_AVAILABLE", False)
    monkeypatch.setattr(runtime, "EXTENSION_ERROR", "not built")
    with pytest.warns(RuntimeWarning, match="not built.*timing the plain model only"):
        rec = serving.serving([str(dense)], threads=1, runs=1, warmup=0, prefill=[(1, 4)], decode_batches=[2],
                              new_tokens=3, prompt_len=2, log=lambda *a: None)
    m = rec["models"]["dense"]
    assert m["variants"]["optimized"] is None and m["fused_mlps"] == 0 and "not built" in m["optimize_skipped"]
    assert m["variants"]["plain"]["decode b2 x3"]["generated_per_run"] == [3]
    assert rec["baseline"] is None and "speedup" not in m
    assert "optimized" not in serving.to_markdown(rec)


def test_decode_generates_exactly_the_asked_tokens_past_eos(one_thread):
    model = tiny_model("llama")
    ids = tokens(n=2, T=4)
    with torch.inference_mode():
        first = model(input_ids=ids).logits[:, -1].argmax(-1)
    # the first greedy token of row 0 is EOS: without min_new_tokens generate would stop there
    model.generation_config.eos_token_id = int(first[0])
    model.config.eos_token_id = int(first[0])
    r = serving.decode_once(model, ids, 6)
    assert r["generated"] == 6 and r["steps"] == 6
    assert 0 < r["decode_s"] < r["total_s"] and r["ttft_s"] > 0
    assert serving.prefill_once(model, tokens(n=3, T=5)) > 0


def test_measure_model_alternates_and_restores(one_thread):
    model = tiny_model("qwen3")
    seen = []
    work = serving.workloads(prefill=[(1, 4)], decode_batches=[1], new_tokens=2, prompt_len=3)
    rec = serving.measure_model(model, work, runs=2, warmup=0,
                                progress=lambda w, v, r, res: seen.append((w.name, v, r)))
    if HAS_EXT:
        assert seen[:4] == [("prefill 1x4", "plain", 0), ("prefill 1x4", "optimized", 0),
                            ("prefill 1x4", "plain", 1), ("prefill 1x4", "optimized", 1)]
        assert rec["fused_mlps"] == 6
    else:
        assert [v for _, v, _ in seen] == ["plain"] * 4
    assert len(seen) == len(rec["variants"]["plain"]) * 2 * (2 if HAS_EXT else 1)
    assert not any("forward" in l.mlp.__dict__ for l in model.model.layers)  # left plain


@pytest.mark.parametrize("args, words", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--runs", "0"], "--runs must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--prefill-len", "0"], "--prefill-len must be a positive integer"),
])
def test_bad_numbers(capsys, dirs, args, words):
    code, _, err = _run(capsys, "bench", "serving", "--model", dirs[0], *args)
    assert code == 2 and words in err


def test_bad_model_and_batches(capsys, tmp_path):
    code, _, err = _run(capsys, "bench", "serving", "--model", tmp_path / "nowhere", "--runs", "1")
    assert code == 2 and err.startswith("error:") and "nowhere" in err
    with pytest.raises(SystemExit) as e:
        main(["bench", "serving", "--model", str(tmp_path), "--decode-batches", "1,0"])
    assert e.value.code == 2
    assert "--decode-batches '1,0': expected comma-separated positive integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="listed twice"):
        serving.workloads(prefill=[(1, 8), (1, 8)])
