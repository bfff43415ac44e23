"""Crash-safe file writing shared by every long job: atomic files and flushed JSONL records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rsrouter.errors import UsageError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give the result the usual umask mode
            tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as exc:  # a read-only folder, a full disk: name the file meant, not the temp
        code = _errno(exc)
        name = getattr(exc, "filename", None)
        where = Path(name) if name is not None else path
        if code is None or path.parent not in (where, where.parent):
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the error that brought us here is the one
                tmp.unlink(missing_ok=True)


def _errno(exc: Exception) -> int | None:
    """The errno of a failed write: an OSError's, or the one a Rust writer (safetensors) puts in
    its message as "Os { code: 28, ... }"."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"Os \{ code: (\d+)", str(exc))
    return int(found.group(1)) if found else None


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None):
    """Tensors to a safetensors file, atomically and written by Python (a full disk is an
    OSError naming ``path``, and nothing half-written is left), with a sorted header, so the
    same tensors and metadata always give the same bytes (safetensors itself orders metadata by
    a random hash)."""
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` must not exist, or be an empty folder (replaced).
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not an empty folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records, one line each, flushed and fsynced: a kill loses at most a partial line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records; a torn last line from a killed run is dropped (and truncated away)."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        # so that the next append starts on a new line; reading needs no write access
        with contextlib.suppress(OSError), path.open("r+b") as fh:
            fh.truncate(len(keep))
    records = []
    for number, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path} line {number} is not a JSON record ({exc.msg}); "
                "remove the file to recompute it."
            ) from exc
    return records


def safetensors_readable(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole safetensors file (a cache reader treats a truncated or
    corrupt entry as missing, and recomputes it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.metadata()
            for key in fh.keys():  # noqa: SIM118
                fh.get_slice(key)
    except (SafetensorError, OSError):
        return False
    return True


@contextmanager
def reading(path: str | os.PathLike, fix: str) -> Iterator[None]:
    """Turn a truncated or corrupt safetensors ``path`` into one sentence naming it and ``fix``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise UsageError(f"{path} is truncated or corrupt; {fix}.") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    """A stable hash of a JSON-able object (sorted keys), for cache keys and fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
