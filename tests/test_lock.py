"""The workspace lock: a second long job refuses in one sentence; stale locks are taken over;
the ranks of one torchrun job share it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

import rsrouter.cli.certify  # noqa: F401  (registers certify)
import rsrouter.cli.train  # noqa: F401  (registers tables, train)
from helpers import fashion_workspace
from rsrouter.cli.app import run
from rsrouter.errors import UsageError
from rsrouter.registry.lock import LOCK_NAME, workspace_lock

SMALL = ["--limit", "2", "--n0", "5", "--n", "20", "--alpha", "0.01"]


def _hold(artifacts, pid: int, command: str = "certify", job: str | None = None) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": socket.gethostname(), "command": command,
              "job": job or f"pid:{pid}", "since": time.time()}  # fmt: skip
    (artifacts / LOCK_NAME).write_text(json.dumps(holder))


@pytest.fixture
def other_process():
    """A live process of this host that is not us (it holds the lock in these tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_long_job_refuses_and_names_the_holder(tmp_path, other_process, capsys):
    ws = fashion_workspace(tmp_path)
    _hold(ws.artifacts, other_process)
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    toml = ws.path.read_text()
    for argv in (["certify", *SMALL], ["tables", "--n", "5"], ["train", "--epochs", "1"]):
        assert run([*argv, "-w", str(ws.root)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: `router {argv[0]}` refused: the workspace is in use by ")
        assert f"`router certify` (pid {other_process} on" in err and err.count("\n") == 1
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*")) == before
    assert ws.path.read_text() == toml  # `tables --n 5` did not save its setting either


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    ws = fashion_workspace(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold(ws.artifacts, dead.pid, command="tables")
    assert run(["certify", *SMALL, "-w", str(ws.root)]) == 0
    assert "2 input(s) certified now" in capsys.readouterr().out
    assert not (ws.artifacts / LOCK_NAME).exists()  # released when the command ended
    (ws.artifacts / LOCK_NAME).write_text("{torn")  # a torn lock file holds nothing
    with ws.lock("certify"):
        holder = json.loads((ws.artifacts / LOCK_NAME).read_text())
        assert holder["pid"] != dead.pid and holder["command"] == "certify"
        with ws.lock("train"):  # the same process again (an outer command): allowed
            pass
        assert (ws.artifacts / LOCK_NAME).exists()
    assert not (ws.artifacts / LOCK_NAME).exists()


def test_the_ranks_of_one_torchrun_job_share_the_lock(tmp_path, monkeypatch, other_process):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "none",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    artifacts = tmp_path / "art"
    with workspace_lock(artifacts, "certify"):  # rank 1 first: it leaves creating to rank 0
        assert not (artifacts / LOCK_NAME).exists()
    job = "torchrun:none:127.0.0.1:29500"
    _hold(artifacts, other_process, job=job)  # rank 0 of this job (another process) holds it
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with workspace_lock(artifacts, "certify"):
            pass
        assert (artifacts / LOCK_NAME).exists()  # only its creator removes it
    monkeypatch.setenv("MASTER_PORT", "29501")  # another job on the same machine
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        refused = pytest.raises(
            UsageError, match=f"in use by `router certify` \\(pid {other_process}"
        )
        with refused, workspace_lock(artifacts, "certify"):
            pass


def test_where_no_lock_can_be_written_the_job_runs_unlocked(tmp_path, monkeypatch):
    """A read-only workspace or a full disk: nobody can write there, so there is no race; the
    command's own writes (if any) report the fault."""
    import errno
    import os

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_NAME) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with workspace_lock(tmp_path / "art", "certify"):
        assert not (tmp_path / "art" / LOCK_NAME).exists()
