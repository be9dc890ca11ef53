"""Calibration the way `datasets` users give it (issue 13, item 2): a Dataset or
IterableDataset with a text column, a list of strings, a hub dataset spec; the
same documents give the same token rows whichever way they come. The cache of
the self-sampled default is keyed by the weights, not by the folder."""
import json

import pytest
import torch

import come_fast
from come_fast.calibration import CalibrationError, calibration_tokens, model_fingerprint
from come_fast.models import load_model
from tiny import tiny_model

WORDS = [f"w{i}" for i in range(100)]


def word_tokenizer():
    """Word-level, ids in [0, 102), within the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


# documents of different lengths, an empty one among them (skipped by every source)
DOCS = [" ".join(WORDS[(7 * i + 3 * j) % 100] for j in range(3 + i % 9)) for i in range(80)]
DOCS[5] = ""


def reference_rows(docs, n, T):
    """What every text source must give: the word ids of the non-empty documents
    in order (the tokenizer maps word w{k} to id k + 2), cut into n rows of T."""
    ids = [int(w[1:]) + 2 for d in docs if d for w in d.split()]
    return torch.tensor(ids[:n * T]).view(n, T)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_every_text_source_gives_the_same_rows(model, tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    n, T = 6, 16
    want = reference_rows(DOCS, n, T)
    # the reference is not trivially satisfied: the rows hold many distinct ids
    assert len(set(want.flatten().tolist())) > 40

    def gen():
        for i, d in enumerate(DOCS):
            yield {"id": i, "text": d}

    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(d for d in DOCS if d))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    sources = {
        "list": DOCS,
        "tuple": tuple(DOCS),
        "Dataset": datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}),
        "IterableDataset": datasets.IterableDataset.from_generator(gen),
        "Dataset.to_iterable_dataset": datasets.Dataset.from_dict({"text": DOCS}).to_iterable_dataset(),
        ".txt": txt,
        ".jsonl": jsonl,
    }
    for name, src in sources.items():
        got = calibration_tokens(src, model, tok, n_samples=n, seq_len=T)
        assert got.dtype == torch.long and torch.equal(got, want), name


def test_text_column(model, tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    want = reference_rows(DOCS, 4, 8)
    ds = datasets.Dataset.from_dict({"body": DOCS, "text": ["w1"] * len(DOCS)})
    assert torch.equal(calibration_tokens(ds, model, tok, 4, 8, text_column="body"), want)
    it = datasets.IterableDataset.from_generator(lambda: ({"body": d} for d in DOCS))
    assert torch.equal(calibration_tokens(it, model, tok, 4, 8, text_column="body"), want)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    assert torch.equal(calibration_tokens(jsonl, model, tok, 4, 8, text_column="body"), want)


def test_compress_takes_a_dataset_and_its_text_column(tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from come_fast import api

    used = []

    def spy(*args, **kw):
        used.append(calibration_tokens(*args, **kw))
        return used[-1]

    monkeypatch.setattr(api, "calibration_tokens", spy)
    ds = datasets.Dataset.from_dict({"body": DOCS})
    res = come_fast.compress(tiny_model("llama"), target_layers=5, method="shortgpt", calib=ds, text_column="body",
                             tokenizer=tok, n_samples=4, seq_len=8)
    assert res.layers_after == 5 and res.settings["calibration"] == [4, 8]
    res = come_fast.compress(tiny_model("llama"), target_layers=5, method="shortgpt", calib=DOCS, tokenizer=tok,
                             n_samples=4, seq_len=8)
    assert len(used) == 2 and all(torch.equal(u, reference_rows(DOCS, 4, 8)) for u in used)


def test_missing_column_names_the_columns(model, tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": DOCS, "id": list(range(len(DOCS)))})
    with pytest.raises(CalibrationError, match=r"no column 'text' \(columns: \['body', 'id'\]\)"):
        calibration_tokens(ds, model, tok, 4, 8)
    # features known in advance: refused before reading
    with pytest.raises(CalibrationError, match=r"no column 'content' \(columns: \['body', 'id'\]\)"):
        calibration_tokens(ds.to_iterable_dataset(), model, tok, 4, 8, text_column="content")
    # features unknown (a generator): refused at the first record
    it = datasets.IterableDataset.from_generator(lambda: ({"body": d, "n": 1} for d in DOCS))
    with pytest.raises(CalibrationError, match=r"record 1: no column 'text' \(columns: \['body', 'n'\]\)"):
        calibration_tokens(it, model, tok, 4, 8)
    with pytest.raises(CalibrationError, match=r"DatasetDict \(splits: \['train'\]\): pass one split"):
        calibration_tokens(datasets.DatasetDict({"train": ds}), model, tok, 4, 8)
    bad = datasets.Dataset.from_dict({"text": ["w1 w2", None, "w3"]})
    with pytest.raises(CalibrationError, match=r"record 2: 'text' must be a string, got null"):
        calibration_tokens(bad, model, tok, 4, 8)


def test_bad_lists(model, tok):
    with pytest.raises(CalibrationError, match=r"list: item 2 must be a string, got int 7"):
        calibration_tokens(["w1 w2", "w3", 7], model, tok, 2, 4)
    with pytest.raises(CalibrationError, match="empty list"):
        calibration_tokens([], model, tok, 2, 4)
    with pytest.raises(CalibrationError, match=r"too short: 3 tokens, need 2 x 4 = 8"):
        calibration_tokens(["w1 w2", "", "w3"], model, tok, 2, 4)
    with pytest.raises(CalibrationError, match="needs the model's tokenizer"):
        calibration_tokens(DOCS, model, None, 2, 4)
    with pytest.raises(CalibrationError, match="type int is not understood"):
        calibration_tokens(5, model, tok, 2, 4)


def test_iterable_is_read_only_as_far_as_needed(model, tok):
    """A long (here endless) stream is not read to its end."""
    datasets = pytest.importorskip("datasets")
    seen = []

    def endless():
        i = 0
        while True:
            seen.append(i)
            yield {"text": DOCS[i % len(DOCS)]}
            i += 1

    got = calibration_tokens(datasets.IterableDataset.from_generator(endless), model, tok, 4, 8)
    assert torch.equal(got, reference_rows(DOCS, 4, 8))
    assert len(seen) < 200


def test_hub_spec_is_streamed_with_config_split_and_column(model, tok, monkeypatch):
    """No hub here: datasets.load_dataset is replaced, and the call it gets is checked."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        return datasets.IterableDataset.from_generator(lambda: ({"content": d, "url": "u"} for d in DOCS))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {"path": "someone/corpus", "name": "en", "split": "validation", "column": "content", "revision": "r1"}
    got = calibration_tokens(spec, model, tok, 4, 8)
    assert torch.equal(got, reference_rows(DOCS, 4, 8))
    assert calls == [("someone/corpus", "en", {"split": "validation", "streaming": True, "revision": "r1"})]
    # a bare id: its train split, the column text_column
    calls.clear()
    got = calibration_tokens("someone/corpus", model, tok, 4, 8, text_column="content")
    assert torch.equal(got, reference_rows(DOCS, 4, 8))
    assert calls == [("someone/corpus", None, {"split": "train", "streaming": True})]
    with pytest.raises(CalibrationError, match=r"someone/corpus \(en\), split 'train', record 1: no column 'text'"):
        calibration_tokens({"path": "someone/corpus", "name": "en"}, model, tok, 4, 8)
    with pytest.raises(CalibrationError, match="needs 'path'"):
        calibration_tokens({"name": "en"}, model, tok, 4, 8)


def test_hub_spec_unreachable_is_one_clear_error(model, tok, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(path, name=None, **kw):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError, match=r"someone/corpus \(en\), split 'test' could not be loaded: .*"
                                               r"offline\? .*ConnectionError: Couldn't reach"):
        calibration_tokens({"path": "someone/corpus", "name": "en", "split": "test"}, model, tok, 4, 8)
    with pytest.raises(CalibrationError, match="could not be loaded"):
        calibration_tokens("someone/corpus", model, tok, 4, 8)


# -- the default calibration's cache key -----------------------------------------------

def test_fingerprint_is_of_the_weights_not_the_folder(tmp_path):
    m = tiny_model("llama", seed=0)
    m.save_pretrained(tmp_path / "a")
    m.save_pretrained(tmp_path / "b")
    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    assert a.config._name_or_path != b.config._name_or_path  # two folders
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(m)
    # different weights: another seed; one layer's down_proj changed a little;
    # a single element changed; another dtype; another BOS
    assert model_fingerprint(tiny_model("llama", seed=1)) != model_fingerprint(a)
    c, _ = load_model(tmp_path / "a")
    with torch.no_grad():
        c.model.layers[3].mlp.down_proj.weight.add_(1e-3)
    assert model_fingerprint(c) != model_fingerprint(a)
    d, _ = load_model(tmp_path / "a")
    with torch.no_grad():
        d.model.layers[5].self_attn.q_proj.weight[17, 3] *= -1
    assert model_fingerprint(d) != model_fingerprint(a)
    e, _ = load_model(tmp_path / "a", dtype=torch.bfloat16)
    assert model_fingerprint(e) != model_fingerprint(a)
    assert model_fingerprint(a, word_tokenizer()) != model_fingerprint(a)  # sampling starts from <eos> (1), not 0


def test_fingerprint_bit_sum_is_exact():
    """The per-tensor term equals an independent sum of the float32 bit patterns."""
    import numpy as np

    from come_fast.calibration import _bits_sum

    w = tiny_model("llama").model.layers[0].mlp.up_proj.weight
    want = int(w.detach().numpy().view(np.int32).astype(np.int64).sum())
    assert _bits_sum(w) == want == _bits_sum(w, chunk=1000)  # chunking changes nothing


def test_default_calibration_cache_is_hit_from_another_folder(tmp_path, monkeypatch):
    from come_fast import calibration

    monkeypatch.setenv("COME_FAST_CACHE", str(tmp_path / "cache"))
    m = tiny_model("llama", seed=0)
    m.save_pretrained(tmp_path / "a")
    m.save_pretrained(tmp_path / "b")
    a, _ = load_model(tmp_path / "a")
    b, _ = load_model(tmp_path / "b")
    first = calibration_tokens(None, a, None, n_samples=3, seq_len=10)
    assert torch.equal(first, calibration.sample_from_model(m, None, 3, 10, seed=0))
    files = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(files) == 1

    def no_sampling(*args, **kw):
        raise AssertionError("sampled again: the cache was missed")

    monkeypatch.setattr(calibration, "sample_from_model", no_sampling)
    assert torch.equal(calibration_tokens(None, b, None, n_samples=3, seq_len=10), first)
    # other weights miss the cache (and would sample)
    with pytest.raises(AssertionError, match="cache was missed"):
        calibration_tokens(None, tiny_model("llama", seed=1), None, n_samples=3, seq_len=10)
