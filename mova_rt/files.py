"""Output files that appear whole or not at all, and checks that fail before any model work.

Standard library only, so every command (the benchmark on a bare GPU machine too) can use it.
"""

from __future__ import annotations

import contextlib
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
