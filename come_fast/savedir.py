"""Saving a folder so that nothing is lost: atomic replacement, recovery after a
kill, cleanup of stale temporary folders, one writer at a time, and refusal of
targets that must never be replaced (the current folder, home, a root, a
folder that is not a checkpoint). Used by every save (checkpoint.py) and by
the cached default model (models.py)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: saves go on unlocked
    fcntl = None


# -- saving a folder safely ----------------------------------------------------------
#
# A folder is saved as NAME under PARENT like this, all under an exclusive lock
# PARENT/.NAME.lock (flock: released by the kernel when its holder dies):
#   1. finish what an earlier, killed save left (_recover, below);
#   2. build into PARENT/.NAME.tmp-XXX, which holds TMP_MARKER (flocked by the
#      writer while it lives, with its pid);
#   3. if NAME exists (overwrite), write OLD_MARKER into it and rename it to
#      PARENT/.NAME.old-XXX; rename the new folder to NAME;
#   4. rename the old folder to PARENT/.NAME.del-XXX and delete it (its marker last).
# A kill at any point leaves either the old or the new folder at NAME, or the
# old one complete as .NAME.old-XXX, which the next save (or check_output_dir)
# puts back. Only folders with these names *and* a marker whose owner is gone
# are ever deleted.

TMP_MARKER = ".come_fast_tmp"  # inside a folder being built
OLD_MARKER = ".come_fast_old"  # inside the previous folder, moved aside while the new one takes its place


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class OutputBusyError(OutputExistsError):
    """Another process is writing the same output folder."""


class UnsafeOutputError(ValueError):
    """An output folder come_fast refuses to write: the current folder, one of
    its parents, the home folder, a filesystem root, a file, or a non-empty
    folder that is not a checkpoint."""


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()  # symlinks followed: compare and write the real folder


def _is_checkpoint(folder: Path) -> bool:
    """A Hugging Face / come_fast checkpoint: config.json and safetensors."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    return "config.json" in names and (folder / "config.json").is_file() and any(
        n.endswith(".safetensors") for n in names)


def _unsafe_reason(real: Path) -> str | None:
    if real.parent == real:
        return "a filesystem root"
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    if cwd is not None and real == cwd:
        return "the current folder"
    if home is not None and real == home:
        return "the home folder"
    if cwd is not None and real in cwd.parents:
        return "a parent of the current folder"
    if home is not None and real in home.parents:
        return "a parent of the home folder"
    return None


def _refuse_unsafe(shown, real: Path) -> None:
    reason = _unsafe_reason(real)
    if reason:
        where = "" if str(shown) == str(real) else f" ({real})"
        raise UnsafeOutputError(f"refusing to write the output folder {shown}{where}: it is {reason}; "
                                "name a new folder for the checkpoint")


def _check_target(shown, real: Path, overwrite: bool) -> None:
    """Whether the folder now at ``real`` may be written (replaced)."""
    if not (real.exists() or real.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"output folder {shown} exists; choose another or pass overwrite=True (--overwrite)")
    if not real.is_dir():
        raise UnsafeOutputError(f"refusing to replace {shown}: it is a file, not a checkpoint folder")
    if any(real.iterdir()) and not _is_checkpoint(real):
        raise UnsafeOutputError(f"refusing to replace {shown}: it is a non-empty folder but not a checkpoint "
                                "(config.json and *.safetensors); --overwrite only replaces checkpoints. "
                                "Choose another folder or empty this one yourself")


def check_output_dir(path, overwrite: bool = False) -> Path:
    """Raise unless a checkpoint may be saved at ``path``; return the resolved path.

    Refused (UnsafeOutputError, a ValueError): the current folder, one of its
    parents, the home folder (or a parent), a filesystem root (symlinks
    resolved), and with ``overwrite`` a file or a non-empty folder that is not a
    checkpoint. OutputExistsError: the folder exists and ``overwrite`` is false.
    OutputBusyError: another process is saving there (without ``overwrite``;
    with it, the save waits its turn). First finishes what a killed earlier save
    left there (puts a moved-aside checkpoint back, deletes its temporary
    folders). Used by the command line before the model loads and by the save.
    """
    real = _resolved(path)
    _refuse_unsafe(path, real)
    if real.parent.is_dir():
        lock = _OutputLock(real)
        if lock.acquire(blocking=False):
            try:
                _recover(real)
            finally:
                lock.release()
        elif not overwrite:
            raise OutputBusyError(f"output folder {path} is being written by another process{lock.holder()}; "
                                  "choose another folder")
    _check_target(path, real, overwrite)
    return real


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        rest = s[s.rindex(")") + 2:].split()
        return rest[0], rest[19]
    except (OSError, ValueError, IndexError):
        return None


def _owner() -> dict:
    st = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": st[1] if st else None, "time": time.time()}


def _pid_alive(pid, start) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = _proc_stat(pid)
    if st is None:
        return True
    return st[0] not in ("Z", "X") and (start is None or st[1] == start)


class _Marker:
    """A file saying "this folder is come_fast's and its writer is alive": the
    writer holds an flock on it (the kernel drops it when the writer dies) and
    its pid is written in it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise
                except OSError:  # a filesystem without locks: the pid alone tells
                    pass
            os.write(self.fd, json.dumps(_owner()).encode())
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _marker_is_stale(path: Path) -> bool:
    """True when ``path`` is one of our markers and its writer is gone."""
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
    except OSError:
        return False  # no marker: not provably ours
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer holds it: alive
            except OSError:
                pass
        try:
            info = json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        # where locks work the flock above decides; the pid only vetoes (a
        # live writer on this host where locks do not work)
        if info.get("host") == socket.gethostname() and _pid_alive(info.get("pid"), info.get("start")):
            return False
        return True
    finally:
        os.close(fd)


class _OutputLock:
    """Exclusive lock PARENT/.NAME.lock for saving PARENT/NAME; the file is
    removed on release (safely: a taker re-checks that the file it locked is
    still the one at the path)."""

    def __init__(self, real: Path):
        self.path = real.parent / f".{real.name}.lock"
        self.fd = None

    def acquire(self, blocking: bool) -> bool:
        if fcntl is None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    return True  # no locks on this filesystem: go on as before, unlocked
                raise
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                return True
            os.close(fd)  # released and removed by its holder meanwhile: take the new one

    def holder(self) -> str:
        try:
            pid = self.path.read_text().split()[0]
            return f" (pid {int(pid)})"
        except (OSError, IndexError, ValueError):
            return ""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def _rmtree_marked(folder: Path, marker: str) -> None:
    """Delete ``folder``, its marker last: a kill midway leaves it recognisable."""
    for child in folder.iterdir():
        if child.name == marker:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / marker).unlink(missing_ok=True)
    folder.rmdir()


def _remove_if_stale(folder: Path, marker: str) -> None:
    try:
        if (folder / marker).exists():
            if _marker_is_stale(folder / marker):
                _rmtree_marked(folder, marker)
        else:
            folder.rmdir()  # only when empty (killed before its marker was written, or the last step of a delete)
    except OSError:
        pass  # best effort: a folder we cannot remove does not stop the save


def _discard_old(old: Path, real: Path) -> None:
    gone = old.with_name(f".{real.name}.del-{old.name[len(real.name) + 6:]}")
    os.rename(old, gone)  # from here on it is garbage, never put back
    _rmtree_marked(gone, OLD_MARKER)


def _recover(real: Path) -> bool:
    """Under the lock: finish what a killed save of ``real`` left. Its stale
    .NAME.tmp-* and .NAME.del-* folders are deleted; a .NAME.old-* folder is
    put back when NAME is missing (killed between moving the old folder aside
    and renaming the new one in), else deleted. True when one was put back."""
    name = real.name
    tmp_p, old_p, del_p = f".{name}.tmp-", f".{name}.old-", f".{name}.del-"
    try:
        entries = [p for p in real.parent.iterdir() if p.name.startswith((tmp_p, old_p, del_p))]
    except OSError:
        return False
    olds = []
    for p in entries:
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(tmp_p):
            _remove_if_stale(p, TMP_MARKER)
        elif p.name.startswith(del_p):
            _remove_if_stale(p, OLD_MARKER)
        elif _marker_is_stale(p / OLD_MARKER):
            olds.append(p)
    restored = False
    if olds and not (real.exists() or real.is_symlink()):
        olds.sort(key=lambda p: (p / OLD_MARKER).stat().st_mtime, reverse=True)
        os.rename(olds[0], real)
        (real / OLD_MARKER).unlink(missing_ok=True)
        restored = True
        olds = olds[1:]
    for p in olds:
        try:
            _discard_old(p, real)
        except OSError:
            pass
    # killed just after its rename into place: the marker went along
    if real.is_dir() and not real.is_symlink() and (real / TMP_MARKER).exists() and _marker_is_stale(real / TMP_MARKER):
        (real / TMP_MARKER).unlink(missing_ok=True)
    return restored


def _atomic_save_dir(build, target: Path, overwrite: bool = True) -> None:
    """Write a folder through ``build(tmpdir)`` and move it into place by
    renames, so that an interrupted write never leaves a half folder and never
    loses the previous one (see the comment above). ``overwrite``: replace an
    existing checkpoint (waiting for another process saving there), else
    OutputExistsError (OutputBusyError when another process is saving there).
    Unsafe targets are refused (check_output_dir)."""
    real = _resolved(target)
    _refuse_unsafe(target, real)
    real.parent.mkdir(parents=True, exist_ok=True)
    lock = _OutputLock(real)
    if not lock.acquire(blocking=overwrite):
        raise OutputBusyError(f"output folder {target} is being written by another process{lock.holder()}; "
                              "choose another folder")
    try:
        _recover(real)
        _check_target(target, real, overwrite)
        _build_and_replace(build, target, real, overwrite)
    finally:
        lock.release()


def _build_and_replace(build, shown, real: Path, overwrite: bool) -> None:
    parent, name = real.parent, real.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    suffix = tmp.name[len(name) + 6:]
    try:
        marker = _Marker(tmp / TMP_MARKER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = old_marker = None
    moved_aside = placed = False
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _check_target(shown, real, overwrite)  # unchanged under the lock, unless by a process ignoring it
        if real.exists() or real.is_symlink():
            old = parent / f".{name}.old-{suffix}"
            old_marker = _Marker(real / OLD_MARKER)
            os.rename(real, old)
            moved_aside = True
        os.rename(tmp, real)  # fails (ENOTEMPTY) should a folder have appeared there meanwhile
        placed = True
    except BaseException:
        if moved_aside and not placed:
            try:
                os.rename(old, real)  # put the old one back
            except OSError:
                pass  # stays aside; the next save puts it back
        if old_marker is not None:
            try:
                (real / OLD_MARKER).unlink(missing_ok=True)
            except OSError:
                pass
            old_marker.close()
        marker.close()
        try:
            _rmtree_marked(tmp, TMP_MARKER)
        except OSError:
            pass  # the next save removes it
        raise
    (real / TMP_MARKER).unlink(missing_ok=True)
    marker.close()
    if old is not None:
        try:
            _discard_old(old, real)
        except OSError as e:
            warnings.warn(f"saved {shown}, but could not delete the previous folder {old}: {e}; "
                          "the next save there removes it")
        finally:
            old_marker.close()
