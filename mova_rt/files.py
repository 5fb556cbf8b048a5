"""Output files that appear whole or not at all, and checks that fail before any model work.

Standard library only, so every command (the benchmark on a bare GPU machine too) can use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile

from .errors import MovaInputError


def reason_of(err: BaseException) -> str:
    """A short one-line reason for an exception (strerror for OS errors, else the first line)."""
    text = (getattr(err, "strerror", None) or str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def ensure_writable_folder(path: str, what: str, fix: str, suffix: str | None = None) -> None:
    """Check that the file `path` can be created: not a directory, ends in `suffix` (if given),
    its parent folder exists (created if missing) and accepts a new file. Raises MovaInputError
    naming `what` and `fix` otherwise."""
    if os.path.isdir(path):
        raise MovaInputError(f"{what} {path} is a directory: {fix}")
    if suffix is not None and os.path.splitext(path)[1].lower() != suffix:
        raise MovaInputError(f"{what} {path} does not end in {suffix}: {fix}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        reason = "a file is in the way" if os.path.isfile(folder) else reason_of(err)
        raise MovaInputError(
            f"cannot create folder {folder} for {what} ({reason}): {fix}"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".mova-rt-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise MovaInputError(f"cannot write {what} into {folder} ({reason_of(err)}): {fix}") from None


def check_output_path(path: str, suffix: str = ".mp4") -> None:
    """Fail fast (before any model work) if an output file cannot be written to `path`.

    Creates the parent folder if it is missing. Raises MovaInputError if the suffix is not
    `suffix`, `path` is a directory, or the folder cannot be created or written to.
    """
    if suffix == ".mp4":
        what, fix = "output video", "pass --output_path with a .mp4 file name in a writable folder"
    else:
        what, fix = "output file", f"pass a {suffix} file name in a writable folder"
    ensure_writable_folder(path, what, fix, suffix=suffix)


def temp_path(path: str, suffix: str) -> str:
    """A hidden temporary name next to `path`, unique per process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def new_folder(out: str, prefix: str):
    """Yields a temporary folder next to `out` to fill; renamed to `out` when the block ends,
    removed if it raises. `out` must not exist yet (MovaInputError otherwise, or when its parent
    cannot be written)."""
    if os.path.exists(out):
        raise MovaInputError(f"{out} already exists: choose a new --out folder or remove it")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as e:
        raise MovaInputError(f"cannot create {out} ({reason_of(e)}): choose a writable --out") \
            from None
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Several outputs of one run, landing together
# ---------------------------------------------------------------------------------------------
class StagedOutputs:
    """Outputs written under temporary names (`stage(path)`) and renamed into place together by
    `commit()`, so a run leaves all of them or none: a failure while writing the second (a full
    disk, a signal) must not leave the first replaced. Leaving the block without commit() removes
    what was staged.

    commit() moves any file it replaces aside first and puts it back if a later rename fails,
    with SIGINT/SIGTERM/SIGHUP held until it is done."""

    def __init__(self):
        self._staged: list[tuple[str, str]] = []        # (temporary, final)

    def stage(self, path: str) -> str:
        """The temporary name to write `path`'s content to (same folder and suffix)."""
        tmp = temp_path(path, os.path.splitext(path)[1])
        self._staged.append((tmp, path))
        return tmp

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp, _ in self._staged:
            remove_quietly(tmp)
        self._staged = []
        return False

    def commit(self) -> None:
        with held_signals():
            aside, placed = [], []
            try:
                for tmp, final in self._staged:
                    if os.path.lexists(final):
                        old = temp_path(final, ".old")
                        os.replace(final, old)
                        aside.append((old, final))
                for tmp, final in self._staged:
                    os.replace(tmp, final)
                    placed.append(final)
            except BaseException:
                for final in placed:                 # undo: the new files out, the old back
                    remove_quietly(final)
                for old, final in aside:
                    os.replace(old, final)
                raise
            for old, _ in aside:
                remove_quietly(old)
            self._staged = []


@contextlib.contextmanager
def kept_unless_bad_input(path: str):
    """For a file a run rewrites as it goes (a benchmark's results): when the run ends on bad
    input (MovaInputError) or a full disk, the file is put back as it was before the run, or
    removed if there was none. Other endings keep what was written (a cut-off run keeps what it
    measured)."""
    backup = None
    if os.path.isfile(path):
        backup = temp_path(path, ".before")
        try:
            os.link(path, backup)         # the same bytes under a second name: no copy, no space
        except OSError:
            try:
                shutil.copy2(path, backup)
            except OSError:
                remove_quietly(backup)
                backup = None             # nothing to put back with: the file stays as written
    try:
        yield
    except Exception as e:
        if isinstance(e, MovaInputError) or disk_full(e) is not None:
            if backup is not None:
                os.replace(backup, path)
                backup = None
            else:
                remove_quietly(path)
        raise
    finally:
        if backup is not None:
            remove_quietly(backup)


# ---------------------------------------------------------------------------------------------
# Termination signals and full disks
# ---------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like SIGINT's KeyboardInterrupt: every
    `except BaseException` / `finally` that removes a temporary file runs (timeout, Slurm, docker
    and torchrun stop a process with SIGTERM; closing its terminal sends SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _raise_terminated(signum, frame):
    import signal
    for name in _STOP_SIGNALS[1:]:          # once is enough: the cleanup must not be cut short
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM and SIGHUP raise Terminated inside the block (the main thread only: Python runs
    handlers there); the previous handlers come back after it."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in _STOP_SIGNALS[1:] if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), _raise_terminated) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


@contextlib.contextmanager
def held_signals():
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (a few renames)."""
    import signal
    sigs = {getattr(signal, n) for n in _STOP_SIGNALS if hasattr(signal, n)}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for the file system"}
# how wrappers that keep only the message say it (safetensors' Rust errors, torch's zip writer)
_FULL_TEXT = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
              "Disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
              "File too large": errno.EFBIG, "os error 27": errno.EFBIG}


def disk_full(err: BaseException) -> str | None:
    """Why a write failed when the disk is full (or a quota or file size limit is hit), from the
    exception or its causes: an OSError's errno (PyAV's too) or the text of the wrappers; None for
    any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return _FULL[err.errno]
        text = str(err)
        for needle, code in _FULL_TEXT.items():
            if needle in text:
                return _FULL[code]
        err = err.__cause__ or err.__context__
    return None
