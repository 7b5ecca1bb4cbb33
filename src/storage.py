"""One place for file-system access: local paths, ``gs://`` and any other fsspec URL.

Everything the project writes or reads (checkpoints, ``args.yaml``, ``summary.csv``, result files,
evaluation state) goes through these helpers, so ``--output gs://bucket/dir`` works and tests can
use fsspec's ``memory://`` filesystem to exercise exactly the same code.

Writes that a later run reads are atomic: the data goes to a temporary name in the same folder and
is then renamed over the final name, so a kill at any instant leaves either the old or the new
complete file (on object stores a single upload is already all-or-nothing). A kill can leave a
temporary ``.<name>.tmp-<hex>`` file behind; readers never open such names and
``remove_stale_temp`` deletes them when a run starts writing to the folder again.

Fault injection for the crash tests: when the environment variable
``ROBUST_VITS_TEST_KILL_BEFORE_RENAME`` holds a glob (e.g. ``last.pth.tar``), the first atomic write
of a matching file name SIGKILLs the process after its temporary file is complete and before the
rename, the moment a real crash would be most harmful. Unset (always, outside tests), it does nothing.
"""
from __future__ import annotations

import fnmatch
import io
import logging
import os
import posixpath
import re
import signal
import uuid
from typing import Any, Iterable, List, Optional

import fsspec

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")


def is_local(path: str) -> bool:
    """True when ``path`` is a plain local path (no ``scheme://``) or a ``file://`` URL."""
    path = str(path)
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(path: str):
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs, p


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return os.path.join(_local(base), *parts)
    return posixpath.join(base, *parts)


def dirname(path: str) -> str:
    path = str(path)
    if is_local(path):
        return os.path.dirname(_local(path))
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(_local(path))
    fs, p = _fs(path)
    return fs.isdir(p)


def makedirs(path: str, exist_ok: bool = True) -> None:
    if is_local(path):
        os.makedirs(_local(path), exist_ok=exist_ok)
        return
    fs, p = _fs(path)
    fs.makedirs(p, exist_ok=exist_ok)


def listdir(path: str) -> List[str]:
    """Base names of the entries directly under ``path``."""
    if is_local(path):
        return sorted(os.listdir(_local(path)))
    fs, p = _fs(path)
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def remove(path: str) -> None:
    if is_local(path):
        if os.path.exists(_local(path)):
            os.remove(_local(path))
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p)


def open_file(path: str, mode: str = "rb", **kwargs: Any):
    """Open ``path`` (local or any fsspec URL) like the builtin ``open``."""
    if is_local(path):
        return open(_local(path), mode, **kwargs)
    return fsspec.open(str(path), mode, **kwargs).open()


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


FAULT_ENV = "ROBUST_VITS_TEST_KILL_BEFORE_RENAME"
_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{8}|\.write-probe-[0-9a-f]{8}")


def _temp_name(name: str) -> str:
    return f".{name}.tmp-{uuid.uuid4().hex[:8]}"


def is_temp_name(name: str) -> bool:
    """True for the temporary names of ``atomic_write_bytes`` and ``check_writable``."""
    return _TEMP_NAME.fullmatch(basename(name)) is not None


def _fault_point(path: str) -> None:
    """Test-only crash between the temporary file and the rename (see the module docstring)."""
    pattern = os.environ.get(FAULT_ENV)
    if pattern and fnmatch.fnmatch(basename(path), pattern):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see a complete file."""
    path = str(path)
    if is_local(path):
        path = _local(path)
        folder = os.path.dirname(path) or "."
        tmp = os.path.join(folder, _temp_name(os.path.basename(path)))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _fault_point(path)
            os.replace(tmp, path)
            try:  # make the rename itself durable
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, p = _fs(path)
    tmp = posixpath.join(posixpath.dirname(p), _temp_name(posixpath.basename(p)))
    with fs.open(tmp, "wb") as f:
        f.write(data)
    _fault_point(path)
    fs.mv(tmp, p)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_append_text(path: str, text: str) -> None:
    """Append by rewriting the whole (small) file atomically: a kill never leaves half a line."""
    old = read_bytes(path) if exists(path) else b""
    atomic_write_bytes(path, old + text.encode("utf-8"))


def torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through an in-memory buffer and an atomic write."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def copy(src: str, dst: str) -> None:
    atomic_write_bytes(dst, read_bytes(src))


def link_or_copy(src: str, dst: str) -> bool:
    """Make ``dst`` a hard link to ``src`` (atomically replacing ``dst``) where the filesystem allows,
    else an atomic copy. Returns True for a link. Safe with atomic writes: files are never rewritten
    in place, so a later write to either name replaces that name only."""
    if is_local(src) and is_local(dst):
        s, d = _local(src), _local(dst)
        tmp = os.path.join(os.path.dirname(d) or ".", _temp_name(os.path.basename(d)))
        try:
            os.link(s, tmp)
            os.replace(tmp, d)
            return True
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    copy(src, dst)
    return False


def glob(pattern: str) -> List[str]:
    if is_local(pattern):
        import glob as _glob

        return sorted(_glob.glob(_local(pattern)))
    fs, p = _fs(pattern)
    proto = str(pattern).split("://", 1)[0]
    return sorted(f"{proto}://{m.lstrip('/')}" if proto != "memory" else f"memory://{m}" for m in fs.glob(p))


def create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False when it already does.

    Atomic on local filesystems (``O_CREAT | O_EXCL``); on object stores (``gs://``, ``memory://``)
    it is a check followed by a write, which narrows but cannot close the race between two writers.
    """
    if is_local(path):
        try:
            fd = os.open(_local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if exists(path):
        return False
    atomic_write_bytes(path, data)
    return True


def check_writable(folder: str) -> None:
    """Raise ``PermissionError`` naming ``folder`` when nothing can be written there."""
    makedirs(folder)
    probe = join(folder, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        with open_file(probe, "wb") as f:
            f.write(b"")
    except OSError as e:
        raise PermissionError(f"output folder {folder} is not writable ({e.strerror or e})") from e
    remove(probe)


def same_file(a: str, b: str) -> bool:
    """True when the paths ``a`` and ``b`` name one file (links and ``./`` spellings included)."""
    a, b = str(a), str(b)
    if is_local(a) and is_local(b):
        a, b = _local(a), _local(b)
        try:
            return os.path.samefile(a, b)
        except OSError:  # one of them does not exist (yet)
            return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _file_in_the_way(folder: str) -> Optional[str]:
    """The existing non-folder among ``folder`` and its parents, if one blocks creating ``folder``."""
    if not is_local(folder):
        return None
    p = os.path.abspath(_local(folder))
    while True:
        if os.path.exists(p):
            return None if os.path.isdir(p) else p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _nearest_existing(folder: str) -> str:
    p = os.path.abspath(_local(folder))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def check_reachable(path: str, what: str) -> None:
    """An unknown protocol, a missing backend or bucket: one line, not a client traceback
    (``memory://`` is left to ``check_output_location``'s single warning)."""
    if not is_local(path) and not str(path).startswith("memory://"):
        check_output_location(path, what)


def check_output_folder(folder: str, what: str, create: bool = True) -> None:
    """Make sure files can be written in ``folder`` (created if needed), before any long work.

    Raises ``src.errors.UsageError`` naming ``what`` (the flag) and the cause: a file where a folder
    is needed (``--out results.csv/plots``), a folder that cannot be created or written, a location
    that cannot be reached. With ``create=False`` a missing local folder is not created (nothing is
    left behind when a later check fails); its nearest existing parent must be writable instead.
    """
    folder = str(folder) or "."
    check_reachable(folder, what)
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise UsageError(f"{what}: cannot create the folder {folder}: {blocker} is a file, not a folder")
    if not create and is_local(folder) and not os.path.isdir(_local(folder)):
        parent = _nearest_existing(folder)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{what}: cannot create the folder {folder} ({parent} is not writable)")
        return
    if not create and not is_local(folder):
        return  # object stores have no folders to create; reachability was checked
    try:
        check_writable(folder)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"{what}: cannot write to the folder {folder} ({reason})") from None


def check_output_file(path: str, what: str, inputs: Iterable[str] = (), create: bool = True) -> None:
    """Refuse, before any work, an output file ``path`` that would replace one of the run's ``inputs``
    (a checkpoint, a CSV being plotted) or that is a folder; make sure its folder can be written.

    Raises ``src.errors.UsageError`` naming ``what`` (the flag); ``create`` as in
    ``check_output_folder``. Whether an existing file of another kind may be replaced is each
    writer's own rule (``src.results.check_results_target``).
    """
    path = str(path)
    check_reachable(path, what)
    if not basename(path) or isdir(path):
        raise UsageError(f"{what}: {path} is a folder, not a file; choose another {what}")
    for src in inputs:
        if src and same_file(path, src):
            raise UsageError(f"{what}: {path} would replace the input {src}; choose another {what}")
    check_output_folder(dirname(path) or ".", what, create=create)


def remove_stale_temp(folder: str, name: Optional[str] = None) -> List[str]:
    """Delete the temporary files a killed write left in ``folder``; returns their paths.

    With ``name``, only the temporary files of that one final file name (``.<name>.tmp-<hex>``):
    what a writer of a shared folder (the working directory, a checkpoints folder another tool
    writes to) may safely remove. Without it, every temporary file in the folder: only call that
    from the one process that writes to ``folder`` (a concurrent writer's temporary file would be
    deleted under it).
    """
    if not isdir(folder):
        return []
    stale = [join(folder, n) for n in listdir(folder)
             if is_temp_name(n) and (name is None or n.startswith(f".{name}.tmp-"))]
    remove_many(stale)
    return stale


def remove_stale_temp_of(path: str) -> List[str]:
    """Delete what a killed write of ``path`` left next to it (its ``.<name>.tmp-<hex>`` files).

    Called by the writers of result files before they write, so the next run cleans up after a
    kill, as the atomic-write promise says.
    """
    return remove_stale_temp(dirname(path) or ".", name=basename(path))


def remove_many(paths: Iterable[str]) -> None:
    for p in paths:
        remove(p)


def check_output_location(path: str, what: str) -> None:
    """Check, before any long work, that an output location can be used; warn about ``memory://``.

    A ``memory://`` output lives only in this process, so it vanishes silently at exit: one warning
    says so. A remote URL (``gs://bucket/dir``) gets one cheap metadata probe, so a bucket that does
    not exist, missing credentials, a missing fsspec backend or no network fail now with one line
    naming ``path`` instead of after the run's first epoch with a raw client traceback. Raises
    ``src.errors.UsageError``; local paths are checked where they are first written.
    """
    path = str(path)
    if is_local(path):
        return
    if path.startswith("memory://"):
        _logger.warning("%s %s is in memory:// (this process's memory): it is gone when the process exits; "
                        "use a local path or gs:// to keep it", what, path)
        return
    try:
        fs, p = _fs(path)
        try:
            fs.info(p)
        except FileNotFoundError:  # a folder to be created is fine; its bucket (top level) must exist
            top = p.strip("/").split("/")[0]
            if top and top != p.strip("/"):
                fs.info(top)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: its bucket does not exist (or is not visible with these "
                         "credentials)") from None
    except Exception as e:  # noqa: BLE001 - any client failure (auth, network, missing backend) is the user's to fix
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {path} cannot be reached ({type(e).__name__}: {msg}); check the path, the "
                         "credentials and the network connection") from None
