"""No silent waits: compress logs its long steps on the ``come_fast`` logger (INFO),
the default calibration's sampling has a progress bar, bars are on by default
only on a terminal, and the library never configures logging itself."""
import logging
import subprocess
import sys

import pytest
import torch

import come_fast
from come_fast import api
from come_fast.calibration import SAMPLING_LABEL
from tiny import tiny_model, tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (conftest.py)


def _messages(caplog):
    assert all(r.name == "come_fast" or r.name.startswith("come_fast.") for r in caplog.records)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_compress_and_save_log_their_steps(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="come_fast")
    res = come_fast.compress(tiny_model("llama"), target_layers=4, calib=tokens(n=8, T=32), progress=False)
    msgs = _messages(caplog)
    # the steps, in order: calibration, the method (scoring, each merge), the compensation, the end
    first = {key: next(i for i, m in enumerate(msgs) if m.startswith(key)) for key in
             ("calibration: 8 rows x 32 tokens", "come: scoring and removing 2 of 6 layers", "layers scored: 6 of 6",
              "merges: 1 of 2", "merges: 2 of 2", "come: 6 -> 4 layers", "compensation (ls): refitting",
              "done: come: 6 -> 4 layers")}
    assert list(first.values()) == sorted(first.values())
    assert sum(m.startswith("merges: ") for m in msgs) == 2  # one record per merge
    assert f"provenance {res.provenance}" in msgs[first["come: 6 -> 4 layers"]]
    refit = len(res.report[-1]["compensation"])
    assert f"compensation: {refit} layers refit" in " | ".join(msgs)
    caplog.clear()
    come_fast.save(res, tmp_path / "o")
    msgs = _messages(caplog)
    assert msgs[0] == f"saving the checkpoint to {tmp_path / 'o'}" and msgs[-1].startswith(f"saved {tmp_path / 'o'}")
    caplog.clear()
    come_fast.load(tmp_path / "o")
    assert _messages(caplog)[-1].startswith(f"loaded {tmp_path / 'o'}: 4 layers")


def test_deletions_are_logged_step_by_step(caplog):
    caplog.set_level(logging.INFO, logger="come_fast")
    come_fast.compress(tiny_model("llama"), target_layers=3, method="sleb", calib=tokens(n=4, T=16), progress=False)
    msgs = _messages(caplog)
    assert [m for m in msgs if m.startswith("removals: ")] == ["removals: 1 of 3", "removals: 2 of 3",
                                                                "removals: 3 of 3"]


def test_default_calibration_sampling_is_shown(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("COME_FAST_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="come_fast")
    seen = []
    res = come_fast.compress(tiny_model("llama"), target_layers=5, method="shortgpt", n_samples=3, seq_len=7,
                             progress=lambda *a: seen.append(a))
    # a progress count per sampled token position, then the method's own
    assert [s for s in seen if s[0] == SAMPLING_LABEL] == [(SAMPLING_LABEL, t, 7) for t in range(1, 8)]
    msgs = _messages(caplog)
    assert any(m.startswith("calibration: sampling 3 rows x 7 tokens from the model") for m in msgs)
    assert any(m.startswith("calibration: sampled in") for m in msgs)
    assert res.settings["calibration"] == [3, 7]
    # the second time the cache answers, and says so
    caplog.clear()
    seen.clear()
    come_fast.compress(tiny_model("llama"), target_layers=5, method="shortgpt", n_samples=3, seq_len=7,
                       progress=lambda *a: seen.append(a))
    assert not [s for s in seen if s[0] == SAMPLING_LABEL]
    assert any("read from the cache" in m for m in _messages(caplog))


class _Recorder:
    made = []

    def __init__(self):
        self.calls = []
        _Recorder.made.append(self)

    def __call__(self, *a):
        self.calls.append(a)

    def close(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bars_by_default_on_a_terminal(monkeypatch, tty):
    class Stderr:
        def isatty(self):
            return tty

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    _Recorder.made = []
    monkeypatch.setattr(api, "_Bars", _Recorder)
    monkeypatch.setattr(sys, "stderr", Stderr())
    come_fast.compress(tiny_model("llama"), target_layers=5, method="sleb", calib=tokens(n=4, T=16))
    if tty:
        (bars,) = _Recorder.made
        assert ("removals", 1, 1) in bars.calls
    else:
        assert _Recorder.made == []
    _Recorder.made = []
    come_fast.compress(tiny_model("llama"), target_layers=5, method="sleb", calib=tokens(n=4, T=16), progress=False)
    assert _Recorder.made == []  # an explicit False wins


def test_the_library_does_not_configure_logging():
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("come_fast").handlers)
    code = ("import logging, come_fast; r = logging.getLogger(); "
            "print(len(r.handlers), r.level == logging.WARNING, logging.getLogger('come_fast').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True", "0"]


def test_cli_logs_to_stderr_unless_quiet(capsys, tmp_path):
    from safetensors.torch import save_file

    from come_fast.cli import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    calib = tmp_path / "c.safetensors"
    save_file({"input_ids": tokens(n=4, T=16)}, str(calib))
    base = ["compress", "--model", src, "--target-layers", 5, "--method", "sleb", "--calib", calib, "--no-sample"]
    assert main([str(a) for a in base + ["--out", tmp_path / "a"]]) == 0
    err = capsys.readouterr().err
    for step in (f"loading {src}", "calibration: 4 rows x 16 tokens", "removals: 1 of 1",
                 f"saving the checkpoint to {tmp_path / 'a'}"):
        assert step in err, (step, err)
    assert main([str(a) for a in base + ["--out", tmp_path / "b", "--quiet"]]) == 0
    err = capsys.readouterr().err
    assert "calibration:" not in err and "saving" not in err
    assert logging.getLogger("come_fast").level == logging.NOTSET  # the CLI put the level back
    assert not [h for h in logging.getLogger("come_fast").handlers if isinstance(h, logging.StreamHandler)]
