"""Saving never loses data (issue 12, "Data loss"):

1. refused targets: the current folder, its parents, home, a root, a non-empty
   folder that is not a checkpoint (one clear error, nothing deleted);
2. replacing moves the old checkpoint aside first and deletes it last; a kill at
   any point leaves a checkpoint at the target or puts the old one back next time;
3. temporary folders of a killed save are removed by the next save (only ours);
4. two processes saving to the same folder: exactly one wins.

The kills are injected at the dangerous line in a child process (os.rename /
os.unlink patched there to SIGKILL the child), not left to timing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from come_fast import savedir
from come_fast.checkpoint import (OutputBusyError, OutputExistsError, UnsafeOutputError, check_output_dir,
                                  save_checkpoint)
from come_fast.cli import main
from come_fast.savedir import _atomic_save_dir, _marker_is_stale, _recover, TMP_MARKER
from tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, signal, sys, time
from pathlib import Path
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["tests"])
from come_fast import savedir

name = Path(cfg["target"]).name
kill = cfg.get("kill")
_rename, _unlink = os.rename, os.unlink

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def is_new_in_place(src, dst):
    return os.path.basename(os.fspath(src)).startswith(f".{name}.tmp-") and os.path.basename(os.fspath(dst)) == name

def rename(src, dst, *a, **k):
    if kill == "before_new_in_place" and is_new_in_place(src, dst):
        die()  # the old checkpoint is aside, the new one not yet in place
    out = _rename(src, dst, *a, **k)
    if kill == "after_new_in_place" and is_new_in_place(src, dst):
        die()  # the new one in place, the old one still aside
    return out

def unlink(path, *a, **k):
    if kill == "deleting_old" and f"/.{name}.del-" in os.fspath(path):
        die()  # while deleting the old checkpoint
    return _unlink(path, *a, **k)

os.rename, os.unlink = rename, unlink

def wait_for_go():
    Path(cfg["pause"]).write_text(str(os.getpid()))
    t0 = time.time()
    while not Path(cfg["go"]).exists():
        if time.time() - t0 > 120:
            sys.exit(3)
        time.sleep(0.02)

def build(tmp):
    (tmp / "config.json").write_text(json.dumps({"tag": cfg["tag"]}))
    (tmp / "model.safetensors").write_bytes(b"\0" * cfg.get("size", 1000))
    if kill == "in_build":
        die()
    if cfg.get("pause"):
        wait_for_go()

try:
    if cfg.get("real"):
        from come_fast.checkpoint import save_checkpoint
        from tiny import tiny_model
        save_checkpoint(tiny_model("llama"), None, cfg["target"], {"tag": cfg["tag"]}, overwrite=cfg["overwrite"])
    else:
        savedir._atomic_save_dir(build, Path(cfg["target"]), overwrite=cfg["overwrite"])
except (ValueError, OSError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
print("ok")
'''


def child(tmp_path, target, tag, overwrite=False, **cfg):
    """Start a python process saving ``target`` (a fake checkpoint tagged ``tag``, or
    with real=True a tiny model through save_checkpoint)."""
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    cfg = {"target": str(target), "tag": tag, "overwrite": overwrite, "tests": str(Path(__file__).parent), **cfg}
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, finish(proc)
        assert time.time() - t0 < timeout, "child never reached its pause"
        time.sleep(0.02)


def fake_build(tag, size=1000):
    def build(tmp):
        (tmp / "config.json").write_text(json.dumps({"tag": tag}))
        (tmp / "model.safetensors").write_bytes(b"\0" * size)
    return build


def tag_of(folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("tag", (cfg.get("come_fast") or {}).get("tag"))


def leftovers(target: Path):
    """Hidden siblings of ``target`` a save may create (.NAME.tmp-*, .old-*, .del-*, .lock)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


# -- 1. refused targets ----------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = tmp_path/home/a/work holding a file; HOME = tmp_path/home."""
    home = tmp_path / "home"
    work = home / "a" / "work"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("keep me")
    (work.parent / "notes.txt").write_text("keep me too")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("out, words", [
    (".", "the current folder"),
    ("..", "a parent of the current folder"),
    ("../../..", "a parent of the current folder"),
    ("~", "the home folder"),
    ("/", "a filesystem root"),
    ("link", "the current folder"),  # a symlink to the current folder
])
def test_refused_targets(workdir, capsys, out, words):
    (workdir / "link").symlink_to(workdir)
    before = sorted(p.name for p in workdir.iterdir()), sorted(p.name for p in workdir.parent.iterdir())
    for overwrite in (True, False):
        with pytest.raises(UnsafeOutputError, match=words):
            check_output_dir(out, overwrite=overwrite)
    # the CLI refuses before the model loads (the model named does not even exist), in one line
    code = main(["compress", "--model", "no-such-model-dir/x/y", "--ratio", "0.3", "--out", out, "--overwrite"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: refusing") and words in err[0], err
    # the save itself refuses too, and nothing was deleted
    with pytest.raises(UnsafeOutputError, match=words):
        _atomic_save_dir(fake_build("x"), Path(out), overwrite=True)
    assert (workdir / "precious.txt").read_text() == "keep me"
    assert (workdir.parent / "notes.txt").read_text() == "keep me too"
    assert (sorted(p.name for p in workdir.iterdir()), sorted(p.name for p in workdir.parent.iterdir())) == before


def test_overwrite_replaces_only_checkpoints(tmp_path, capsys):
    model = tiny_model("llama")
    # a folder with other things in it is not replaced, by the CLI (early) nor by the save
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    code = main(["compress", "--model", "no-such-model-dir/x/y", "--ratio", "0.3", "--out", str(other), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a checkpoint" in err[0], err
    with pytest.raises(UnsafeOutputError, match="not a checkpoint"):
        save_checkpoint(model, None, other, {"tag": 1}, overwrite=True)
    # config.json alone is not a checkpoint either
    (other / "config.json").write_text("{}")
    with pytest.raises(UnsafeOutputError, match="not a checkpoint"):
        save_checkpoint(model, None, other, {"tag": 1}, overwrite=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    # nor a file
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(UnsafeOutputError, match="file"):
        save_checkpoint(model, None, f, {"tag": 1}, overwrite=True)
    assert f.read_text() == "data"
    # without overwrite: an existing folder, even empty, is refused as before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutputExistsError, match="exists"):
        save_checkpoint(model, None, empty, {"tag": 1})
    # with it: an empty folder and a checkpoint are replaced
    save_checkpoint(model, None, empty, {"tag": 1}, overwrite=True)
    assert tag_of(empty) == 1
    save_checkpoint(model, None, empty, {"tag": 2}, overwrite=True)
    assert tag_of(empty) == 2 and leftovers(empty) == []
    assert not (empty / TMP_MARKER).exists() and not (empty / savedir.OLD_MARKER).exists()
    # a symlink to a checkpoint: the checkpoint it points to is replaced, the link stays
    link = tmp_path / "link"
    link.symlink_to(empty)
    save_checkpoint(model, None, link, {"tag": 3}, overwrite=True)
    assert link.is_symlink() and tag_of(empty) == 3 and leftovers(empty) == []


# -- 2. replacing: old aside, new in place, old deleted; recovered next time ------------

def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _atomic_save_dir(fake_build("old"), out)

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        _atomic_save_dir(broken, out, overwrite=True)
    assert tag_of(out) == "old" and leftovers(out) == []
    # the rename of the new folder into place fails: the old one is put back
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".o.tmp-"):
            raise OSError("rename failed")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _atomic_save_dir(fake_build("new"), out, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert tag_of(out) == "old" and leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors"]


def test_killed_while_replacing(tmp_path):
    """A tiny model replaced by another; the child is killed at each dangerous step."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    save_checkpoint(tiny_model("llama"), None, out, {"tag": "v1"})

    # killed after the old one was moved aside, before the new one is in place
    code, _, err = finish(child(tmp_path, out, "v2", overwrite=True, real=True, kill="before_new_in_place"))
    assert code == -signal.SIGKILL, err
    assert not out.exists()
    assert any(n.startswith(".ckpt.old-") for n in leftovers(out)), leftovers(out)
    # the next run puts it back (here the CLI's early check: it exists again, so without --overwrite it is refused)
    with pytest.raises(OutputExistsError):
        check_output_dir(out)
    assert tag_of(out) == "v1" and leftovers(out) == []  # the killed save's temporary folder is gone too
    assert not (out / savedir.OLD_MARKER).exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6

    # killed while deleting the old one: the new one is complete, the next save deletes the rest
    code, _, err = finish(child(tmp_path, out, "v3", overwrite=True, real=True, kill="deleting_old"))
    assert code == -signal.SIGKILL, err
    assert tag_of(out) == "v3" and not (out / TMP_MARKER).exists()
    assert any(n.startswith(".ckpt.del-") for n in leftovers(out)), leftovers(out)
    AutoModelForCausalLM.from_pretrained(out)
    save_checkpoint(tiny_model("llama"), None, out, {"tag": "v4"}, overwrite=True)
    assert tag_of(out) == "v4" and leftovers(out) == []

    # killed just after the new one is in place: the old one (aside) is deleted next time, not put back
    code, _, err = finish(child(tmp_path, out, "v5", overwrite=True, kill="after_new_in_place"))
    assert code == -signal.SIGKILL, err
    assert tag_of(out) == "v5" and any(n.startswith(".ckpt.old-") for n in leftovers(out))
    with pytest.raises(OutputExistsError):
        check_output_dir(out)
    assert tag_of(out) == "v5" and leftovers(out) == [] and not (out / TMP_MARKER).exists()


# -- 3. temporary folders of a killed save ------------------------------------------------

def test_stale_temporary_folders_are_removed(tmp_path):
    out = tmp_path / "o"
    code, _, err = finish(child(tmp_path, out, "killed", kill="in_build", size=2_000_000))
    assert code == -signal.SIGKILL, err
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").stat().st_size == 2_000_000
    assert not out.exists()
    # not ours: no marker, or another target's name
    foreign = tmp_path / ".o.tmp-foreign"
    foreign.mkdir()
    (foreign / "data").write_text("someone else's")
    other = tmp_path / ".other.tmp-abc"
    other.mkdir()
    (other / TMP_MARKER).write_text(json.dumps({"pid": 999999999}))
    _atomic_save_dir(fake_build("new"), out, overwrite=False)
    assert tag_of(out) == "new"
    assert not stale[0].exists()
    assert (foreign / "data").exists() and (other / TMP_MARKER).exists()
    assert leftovers(out) == [".o.tmp-foreign"]


def test_live_writers_folder_is_kept(tmp_path):
    out = tmp_path / "o"
    a = child(tmp_path, out, "a", pause=str(tmp_path / "paused"), go=str(tmp_path / "go"))
    try:
        wait_for(tmp_path / "paused", a)
        (live,) = [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]
        assert not _marker_is_stale(live / TMP_MARKER)
        _recover(out)  # a cleaner that ignored the lock still leaves a live writer's folder alone
        assert (live / "model.safetensors").exists()
    finally:
        (tmp_path / "go").touch()
    code, _, err = finish(a)
    assert code == 0, err
    assert tag_of(out) == "a" and leftovers(out) == []


# -- 4. two processes, one folder -------------------------------------------------------

def test_concurrent_saves_one_wins(tmp_path):
    out = tmp_path / "o"
    a = child(tmp_path, out, "a", pause=str(tmp_path / "paused"), go=str(tmp_path / "go"))
    try:
        wait_for(tmp_path / "paused", a)  # a holds the lock, its checkpoint is half written
        code, _, err = finish(child(tmp_path, out, "b"))
        assert code == 2 and "OutputBusyError" in err and "being written by another process" in err, err
        # the command line says so before it loads anything
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, "-m", "come_fast.cli", "compress", "--model", "no-such-model-dir/x/y",
                            "--ratio", "0.3", "--out", str(out)], capture_output=True, text=True, env=env,
                           timeout=120)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "being written by another process" in lines[0], r.stderr
        assert f"pid {a.pid}" in lines[0]
    finally:
        (tmp_path / "go").touch()
    code, out_text, err = finish(a)
    assert code == 0 and "ok" in out_text, err
    assert tag_of(out) == "a" and leftovers(out) == []
    # later, without overwrite: it exists
    code, _, err = finish(child(tmp_path, out, "c"))
    assert code == 2 and "OutputExistsError" in err and "exists" in err, err
    assert tag_of(out) == "a"


def test_concurrent_overwrites_take_turns(tmp_path):
    out = tmp_path / "o"
    a = child(tmp_path, out, "a", overwrite=True, pause=str(tmp_path / "paused"), go=str(tmp_path / "go"))
    try:
        wait_for(tmp_path / "paused", a)
        b = child(tmp_path, out, "b", overwrite=True)
        time.sleep(1.0)
        assert b.poll() is None  # waits for a's save instead of racing it
    finally:
        (tmp_path / "go").touch()
    assert finish(a)[0] == 0
    code, _, err = finish(b)
    assert code == 0, err
    assert tag_of(out) == "b" and leftovers(out) == []


def test_final_rename_refuses_a_target_that_appeared(tmp_path):
    """A process that ignores the lock creates the target during our build: the
    save without overwrite fails and leaves that folder alone."""
    out = tmp_path / "o"

    def build(tmp):
        fake_build("ours")(tmp)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputExistsError):
        _atomic_save_dir(build, out, overwrite=False)
    assert (out / "theirs.txt").read_text() == "theirs" and leftovers(out) == []


def test_busy_error_is_a_file_exists_error():
    assert issubclass(OutputBusyError, FileExistsError) and issubclass(UnsafeOutputError, ValueError)
