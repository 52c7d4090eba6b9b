"""Outputs that never cost a user their data: safe targets, atomic writes, stale sweeps.

Every file or directory flexmerge writes goes through :func:`atomic_path`: the target is checked
first (:func:`check_target`: only what flexmerge made, an empty directory or a new path may be
replaced, unless ``force``), written under a temporary name beside it that carries the writer's
pid (``.NAME.flexmerge-PID-new.tmp``), and renamed into place when complete. Interrupted writers
remove their temporaries; a killed one's are swept by the next writer of the same target
(:func:`sweep_stale`). Write failures become one-line errors naming the target (:func:`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import FlexMergeError
from .io import _first_line

_TMP_TAG = "flexmerge"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.EISDIR, errno.ENOTDIR}


def _tmp_name(target: Path, role: str) -> str:
    """``.NAME.flexmerge-PID-ROLE.tmp``: a name that says who made it, so that a later run can
    sweep it once that process is gone."""
    return f".{target.name}.{_TMP_TAG}-{os.getpid()}-{role}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporaries that an interrupted flexmerge process left next to ``target``
    (killed by SIGKILL, power loss). A replaced output that was moved aside but whose successor
    never arrived is put back. Returns what was swept."""
    rx = re.compile(re.escape(f".{target.name}.{_TMP_TAG}-") + r"(\d+)-([A-Za-z0-9_]+)\.tmp")
    swept = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return swept
    for entry in entries:
        m = rx.fullmatch(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not target.exists() and not target.is_symlink():
            with contextlib.suppress(OSError):
                os.replace(entry, target)
                swept.append(entry)
                continue
        _remove(entry)
        swept.append(entry)
    return swept


def write_error(exc: BaseException, target: Path) -> FlexMergeError | None:
    """A one-line error naming ``target`` for a failed write (disk full, file too large,
    permissions, read-only file system), or None if ``exc`` is not a write failure. safetensors'
    ``SafetensorError`` is not an ``OSError``; its message carries the OS error."""
    reason = None
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        reason = exc.strerror or str(exc)
    elif type(exc).__name__ == "SafetensorError":
        m = re.search(r"(?:I/O error|IoError)[^A-Za-z]*(.*?)(?: \(os error (\d+)\)|$)", str(exc))
        if m:
            reason = m.group(1).strip(" :\"{}") or str(exc)
    if reason is None:
        return None
    fix = "free disk space or choose another location" if "space" in reason.lower() or "large" in reason.lower() \
        else "choose a location you can write to"
    return FlexMergeError(f"cannot write {target}: {reason}; {fix}")


def check_target(target: str | os.PathLike, *, what: str, replaceable=None, force: bool | None = False,
                 hint: str = "choose a new path") -> Path:
    """Refuse to replace anything flexmerge did not create.

    ``target`` may be replaced only if it does not exist, is an empty directory, is recognised as
    flexmerge's own by ``replaceable(path)`` (e.g. a bundle whose manifest names its format), or
    ``force`` is set (``None``: the caller has no ``--force`` option, so messages do not offer
    one). Never the current directory, the home directory or a file-system root.
    """
    target = Path(target).expanduser()
    forcing = "" if force is None else ", or pass --force to replace it"
    if target.name in ("", ".", ".."):
        raise FlexMergeError(f"{what} {str(target)!r} names no file or directory to create; {hint}")
    try:
        resolved = target.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise FlexMergeError(f"{what} {target} cannot be resolved ({_first_line(exc)}); {hint}") from None
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    if resolved in protected or any(resolved == p for p in Path.cwd().resolve().parents):
        raise FlexMergeError(f"{what} {target} is the current, home or a parent directory; flexmerge never "
                             f"replaces it: {hint}")
    if not target.exists() and not target.is_symlink():
        return target
    if force:
        return target
    if target.is_symlink():
        raise FlexMergeError(f"{what} {target} exists (a symbolic link); {hint}{forcing}")
    if not target.is_dir() and not target.is_file():
        raise FlexMergeError(f"{what} {target} exists and is not a regular file (a pipe or device); {hint}{forcing}")
    if target.is_dir():
        try:
            empty = not any(target.iterdir())
        except OSError as exc:
            raise FlexMergeError(f"cannot read {what} {target} ({exc.strerror}); {hint}") from None
        if empty or (replaceable is not None and replaceable(target)):
            return target
        raise FlexMergeError(f"{what} {target} exists and was not made by flexmerge (or holds files it did not "
                             f"write); {hint}{forcing}")
    if replaceable is not None and replaceable(target):
        return target
    raise FlexMergeError(f"{what} {target} exists and was not made by flexmerge (or is not recognisable as "
                         f"its output, e.g. a .pt export); {hint}{forcing}")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _apply_umask(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp and safetensors create private paths (0600/0700); give outputs the
    permissions a plain open()/mkdir() would have, so that other users can read them."""
    umask = _umask()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask)
    if is_dir:
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool, *, what: str = "output", replaceable=None,
                force: bool | None = False, hint: str = "choose a new path") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    ``target`` is checked first with :func:`check_target` (nothing that flexmerge did not make is
    replaced unless ``force``). On any exception, KeyboardInterrupt and SIGTERM included, the
    temporary path is removed, so an interrupted run never leaves a half written output; an
    existing ``target`` is replaced only after the new one is complete. Stale temporaries of
    ``target`` from killed runs are swept first. Write failures (disk full, permissions) become
    one-line errors naming ``target``.
    """
    target = check_target(target, what=what, replaceable=replaceable, force=force, hint=hint)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, target) or FlexMergeError(f"cannot create {target.parent} ({exc.strerror}); "
                                                         f"{hint}") from None
    sweep_stale(target)
    tmp = target.parent / _tmp_name(target, "new")
    old = target.parent / _tmp_name(target, "old")
    try:
        _remove(tmp)
        if is_dir:
            tmp.mkdir()
        else:
            tmp.touch()
    except OSError as exc:
        raise write_error(exc, target) or FlexMergeError(f"cannot write {target} ({exc.strerror}); {hint}") from None
    try:
        yield tmp
        _apply_umask(tmp, is_dir)
        if target.exists() or target.is_symlink():
            os.replace(target, old) if not target.is_symlink() else target.unlink()
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        if old.exists() and not target.exists():
            os.replace(old, target)
        err = write_error(exc, target) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise


def write_json_atomic(path: str | os.PathLike, obj, **guard) -> None:
    with atomic_path(path, is_dir=False, **guard) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def json_format_of(path: Path) -> str | None:
    """The ``format`` field of a JSON file (how flexmerge recognises its own JSON outputs)."""
    try:
        if not path.is_file() or path.stat().st_size > (64 << 20):
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("format") if isinstance(data, dict) else None
