"""One long job per workspace: `router tables`, `train`, `certify` and `finetune-expert` hold
``<artifacts>/lock.json`` while they run, so a second one refuses instead of racing the first
and redoing its work.

The lock names its holder (pid, host, command, job). The ranks of one torchrun job share it:
rank 0 creates it, the other ranks only check that no other job holds it. A lock whose
process is gone (a kill -9, a crash) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsrouter import distributed
from rsrouter.errors import UsageError

LOCK_NAME = "lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(path: Path) -> dict | None:
    """The holder recorded in ``path``; None when the file is gone. A torn or foreign file
    counts as held by nobody alive."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    """True when the holder is surely gone: a process of this host that no longer runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return not isinstance(pid, int)
    return not _alive(pid)


def _refuse(path: Path, holder: dict, command: str) -> UsageError:
    since = holder.get("since")
    ok = isinstance(since, (int, float))
    when = time.strftime(" since %H:%M:%S UTC", time.gmtime(since)) if ok else ""
    return UsageError(
        f"`router {command}` refused: the workspace is in use by `router "
        f"{holder.get('command', '?')}` (pid {holder.get('pid')} on {holder.get('host')}{when}); "
        f"wait for it to finish, or stop it, then run this again (its lock is {path})."
    )


def _create(path: Path, me: dict) -> bool:
    """Create the lock file holding ``me``; False if it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(me, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _acquire(path: Path, me: dict, command: str, rank0: bool) -> bool:
    """Take the lock for ``me`` (True when this call created the file) or refuse."""
    for _ in range(5):
        holder = _read(path)
        if holder is not None and holder.get("job") == me["job"] and not (rank0 and _stale(holder)):
            return False  # this job (another rank, or an outer command) holds it
        if holder is not None and not _stale(holder):
            raise _refuse(path, holder, command)
        if holder is not None:  # stale: one taker wins the rename, the others retry
            stale = path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
        if not rank0:
            return False  # rank 0 of this job creates it
        if _create(path, me):
            return True
    raise _refuse(path, _read(path) or {}, command)


@contextmanager
def workspace_lock(artifacts: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the lock of the workspace whose artifacts folder is ``artifacts`` for the block,
    or refuse in one sentence naming the holder. Re-entrant within one job.

    Where no lock file can be written (a read-only workspace, a full disk) nobody can write
    there either, so there is nothing to race: the block runs unlocked, and a command that does
    need to write reports that itself."""
    path = Path(artifacts) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "job": distributed.job_id(), "since": time.time()}  # fmt: skip
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = _acquire(path, me, command, rank0)
    except OSError:
        created = False
    try:
        yield
    finally:
        if created and (_read(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
