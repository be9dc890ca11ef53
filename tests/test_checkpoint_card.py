"""Checkpoint hygiene: the model card save writes (README.md, in the same atomic
write), base_model in come_fast.json, push_to_hub against a mocked hub API,
no GGUF leftovers in the saved config, and one data-folder variable."""
import json
import re
import shlex

import pytest
import torch
from transformers import AutoModelForCausalLM

import come_fast
from come_fast.card import DEFAULT_BASE, README, base_model_of, read_front_matter
from come_fast.cli import main
from tiny import tiny_model, tokens

HUB_ID = "someone/tiny-llama"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (conftest.py)


def _word_tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


def _compress(name_or_path=HUB_ID, **kw):
    """A tiny Llama that says it came from ``name_or_path`` (a hub id: no such folder here), compressed 6 -> 4."""
    m = tiny_model("llama")
    m.config._name_or_path = name_or_path
    m.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what a GGUF source leaves behind
    return come_fast.compress(m, target_layers=4, calib=tokens(n=8, T=32), tokenizer=_word_tokenizer(),
                              progress=False, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    res = _compress()
    res.evaluation = {"tasks": {"wikitext2": {"ppl": 23.456}}}
    out = tmp_path_factory.mktemp("card") / "tiny-come"
    come_fast.save(res, out)
    return res, out


def _card(folder):
    text = (folder / README).read_text()
    return text, read_front_matter(text)


def _card_provenance(text):
    """The provenance as the card shows it: the JSON block, and the table's original layers per layer."""
    block = re.search(r"```json\n(.*?)\n```", text, re.S).group(1)
    rows = re.findall(r"^\| (\d+) \| ([\d, ]+)(?: \(merged as .*\))? \|$", text, re.M)
    return json.loads(block), [(int(i), [int(x) for x in t.split(", ")]) for i, t in rows]


def _flat(p):
    return [x for q in p for x in _flat(q)] if isinstance(p, list) else [p]


def test_card_front_matter_and_body(saved):
    res, out = saved
    text, fm = _card(out)
    assert fm == {"base_model": HUB_ID, "library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": ["come_fast", "depth-pruning", "come"]}
    # the provenance shown is the result's, which is the last merge step's in the report
    merges = [s for s in res.report if "pair" in s]
    assert len(merges) == 2 and merges[-1]["provenance"] == res.provenance
    js, rows = _card_provenance(text)
    assert js == res.provenance
    assert rows == [(i, _flat(p)) for i, p in enumerate(res.provenance)]
    assert any(isinstance(p, list) for p in res.provenance)  # a merge is there to show
    assert "| layers | 6 -> 4 |" in text
    assert f"| achieved ratio | {100 * res.achieved_ratio:.2f}% of the parameters removed |" in text
    assert "| target | 4 layers |" in text and "| method | `come` |" in text
    assert f"| parameters | {res.params_before:,} -> {res.params_after:,} |" in text
    assert "| this model | 23.46 |" in text  # the evaluation the result carried
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in text and "trust_remote_code" not in text
    assert "## Command" not in text  # no command line outside the CLI


def test_metadata_records_base_model_and_the_config_is_clean(saved):
    res, out = saved
    meta = json.loads((out / "come_fast.json").read_text())
    assert meta["base_model"] == HUB_ID == res.base_model
    assert meta["evaluation"] == res.evaluation and meta["provenance"] == res.provenance
    assert meta["settings"]["target"] == {"ratio": None, "target_layers": 4, "rounding": "nearest"}
    cfg = json.loads((out / "config.json").read_text())
    assert "_model_name_or_path" not in cfg  # the GGUF's own name is gone
    assert cfg.get("_name_or_path", HUB_ID) == HUB_ID  # never a temporary or cache folder
    assert cfg["come_fast"]["base_model"] == HUB_ID
    # the folder still loads as a plain checkpoint, and come_fast.load gives the record back
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 4
    assert come_fast.load(out)[2]["base_model"] == HUB_ID


def test_card_ratio_target_and_local_base(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    _word_tokenizer().save_pretrained(src)
    res = come_fast.compress(str(src), ratio=0.3, method="shortgpt", calib=tokens(n=8, T=32), progress=False)
    assert res.base_model == str(src.resolve())
    come_fast.save(res, tmp_path / "o")
    text, fm = _card(tmp_path / "o")
    # a local folder is not a hub id: named in the body and come_fast.json, not in the front matter
    assert "base_model" not in fm and fm["tags"] == ["come_fast", "depth-pruning", "shortgpt"]
    assert f"| base model | `{src.resolve()}` |" in text
    assert "| target | ratio 0.3 of the parameters (rounding nearest) |" in text
    assert json.loads((tmp_path / "o" / "come_fast.json").read_text())["base_model"] == str(src.resolve())
    # compressing that checkpoint again: its base model is the original one
    assert base_model_of(str(tmp_path / "o")) == str(src.resolve())
    assert base_model_of("smollm2-135m") == DEFAULT_BASE and base_model_of(tiny_model("llama")) is None


def test_cli_card_records_the_command(tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    calib = tmp_path / "c.safetensors"
    save_file({"input_ids": tokens(n=8, T=32)}, str(calib))
    argv = ["compress", "--model", str(src), "--target-layers", "4", "--method", "sleb", "--calib", str(calib),
            "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    text, fm = _card(tmp_path / "o")
    cmd = re.search(r"## Command\n\n```bash\n(.*?)\n```", text, re.S).group(1)
    assert cmd == "come-fast " + shlex.join(argv) and shlex.split(cmd)[1:] == argv
    meta = json.loads((tmp_path / "o" / "come_fast.json").read_text())
    assert meta["command"] == cmd and fm["tags"][-1] == "sleb"
    _, rows = _card_provenance(text)
    assert rows == [(i, _flat(p)) for i, p in enumerate(meta["provenance"])]


class _Hub:
    """Records HfApi.create_repo / upload_folder calls; the uploaded folder is read at call time."""

    def __init__(self, monkeypatch):
        import huggingface_hub

        self.calls = []
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw, api.token))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, **kw):
            from pathlib import Path

            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
            hub.calls.append(("upload_folder", repo_id, kw, files))
            return "commit-info"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def _check_upload(hub, repo, private, token, message):
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    (_, rid, kw, tok), (_, rid2, ukw, files) = hub.calls
    assert rid == rid2 == repo and kw["exist_ok"] is True and kw["private"] is private and tok == token
    assert ukw["commit_message"] == message
    assert {"config.json", "model.safetensors", README, "come_fast.json", "tokenizer.json"} <= set(files)
    card = files[README].decode()
    fm = read_front_matter(card)
    assert fm["base_model"] == HUB_ID and fm["library_name"] == "transformers"
    assert fm["tags"] == ["come_fast", "depth-pruning", "come"]
    assert f'from_pretrained("{repo}")' in card  # loading from the repository, not from a temporary folder
    assert json.loads(files["config.json"])["num_hidden_layers"] == 4
    return files


def test_push_to_hub_a_result(monkeypatch):
    hub = _Hub(monkeypatch)
    res = _compress()
    out = come_fast.push_to_hub(res, "me/tiny-come", private=True, token="hf_test", commit_message="first")
    assert out == "commit-info"
    files = _check_upload(hub, "me/tiny-come", True, "hf_test", "first")
    js, _ = _card_provenance(files[README].decode())
    assert js == res.provenance
    assert json.loads(files["come_fast.json"])["base_model"] == HUB_ID


def test_push_to_hub_a_saved_folder(monkeypatch, saved):
    res, out = saved
    hub = _Hub(monkeypatch)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    come_fast.push_to_hub(str(out), "me/from-folder")
    files = _check_upload(hub, "me/from-folder", False, None, "Upload model compressed with come_fast")
    # the same files as saved, the card written again for the repository; the folder itself untouched
    assert {k: v for k, v in files.items() if k != README} == {k: v for k, v in before.items() if k != README}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "| this model | 23.46 |" in files[README].decode()


def test_push_to_hub_a_model_loaded_from_a_checkpoint(monkeypatch, saved):
    res, out = saved
    hub = _Hub(monkeypatch)
    model, tok, meta = come_fast.load(out)
    come_fast.push_to_hub(model, "me/reloaded", tokenizer=tok, commit_message="again")
    files = _check_upload(hub, "me/reloaded", False, None, "again")
    js, _ = _card_provenance(files[README].decode())
    assert js == res.provenance == meta["provenance"]  # the record the loaded config carried


def test_push_to_hub_refuses_what_is_no_checkpoint(monkeypatch, tmp_path):
    hub = _Hub(monkeypatch)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        come_fast.push_to_hub(tmp_path, "me/x")
    with pytest.raises(ValueError, match="repo_id"):
        come_fast.push_to_hub(tmp_path, "a/b/c")
    assert hub.calls == []
    assert "push_to_hub" in come_fast.__all__


# -- the data folder: one variable ----------------------------------------------------

def test_data_dir_variable(monkeypatch, tmp_path):
    import warnings

    from come_fast.cli import _default_data_dir
    from come_fast.eval import default_data_dir

    monkeypatch.delenv("COME_FAST_DATA", raising=False)
    monkeypatch.setenv("COME_FAST_DATA_DIR", str(tmp_path / "new"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_data_dir() == tmp_path / "new" and _default_data_dir() == str(tmp_path / "new")
        monkeypatch.setenv("COME_FAST_DATA", str(tmp_path / "old"))  # the new name wins, silently
        assert default_data_dir() == tmp_path / "new"
    monkeypatch.delenv("COME_FAST_DATA_DIR")
    with pytest.warns(DeprecationWarning, match="COME_FAST_DATA_DIR"):
        assert default_data_dir() == tmp_path / "old"
    with pytest.warns(DeprecationWarning, match="COME_FAST_DATA_DIR"):
        assert _default_data_dir() == str(tmp_path / "old")


def test_cli_reads_the_data_variable(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("COME_FAST_DATA", raising=False)
    monkeypatch.setenv("COME_FAST_DATA_DIR", str(tmp_path / "nowhere"))
    assert main(["eval", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 2
    assert f"data folder '{tmp_path / 'nowhere'}' not found" in capsys.readouterr().err
    monkeypatch.delenv("COME_FAST_DATA_DIR")
    monkeypatch.setenv("COME_FAST_DATA", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert main(["eval", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 2
    assert f"data folder '{tmp_path / 'old'}' not found" in capsys.readouterr().err


# -- the embedded GGUF model ------------------------------------------------------------

@pytest.mark.real_model
def test_smollm2_saves_without_gguf_leftovers(smollm2, tmp_path):
    from come_fast.checkpoint import save_checkpoint

    fresh, tok = smollm2
    m = fresh()
    assert "_model_name_or_path" not in m.config.to_dict()
    assert base_model_of(m) == DEFAULT_BASE
    save_checkpoint(m, tok, tmp_path / "o", {"method": "none", "base_model": base_model_of(m)})
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert not [k for k in cfg if k.startswith("_")]  # no _model_name_or_path, no cache or temporary path
    assert read_front_matter((tmp_path / "o" / README).read_text())["base_model"] == DEFAULT_BASE
