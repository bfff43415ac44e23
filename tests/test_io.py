"""Crash safety of the shared writers: atomic files and torn JSONL tails."""

from __future__ import annotations

import json
import os

import pytest

from rsrouter.errors import UsageError
from rsrouter.io import append_jsonl, atomic_path, read_json, read_jsonl, sha256_json, write_json


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_read_jsonl_drops_and_truncates_a_torn_last_line(tmp_path):
    path = tmp_path / "records.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    with path.open("a") as fh:
        fh.write('{"i": 2, "rad')  # a kill in the middle of a write
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, [{"i": 2}])
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_corrupt_record_mid_file_is_one_sentence(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(UsageError, match="line 2 is not a JSON record"):
        read_jsonl(path)


def test_read_json_errors_are_one_sentence(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_safetensors_files_have_deterministic_bytes(tmp_path):
    import torch
    from safetensors import safe_open

    from rsrouter.io import write_safetensors

    tensors = {"radius": torch.rand(5), "counts": torch.arange(10).view(5, 2), "b": torch.ones(3)}
    meta = {f"key{i}": str(i) for i in range(12)}  # safetensors alone orders these by chance
    blobs = set()
    for i in range(3):
        write_safetensors(tmp_path / f"t{i}.safetensors", tensors, dict(reversed(meta.items())))
        blobs.add((tmp_path / f"t{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "t0.safetensors"), framework="pt") as fh:
        assert fh.metadata() == meta
        assert all(torch.equal(fh.get_tensor(k), v) for k, v in tensors.items())
    header = blobs.pop()[8:].split(b"}}", 1)[0]
    assert header.index(b'"key0"') < header.index(b'"key1"') < header.index(b'"key9"')


def test_atomic_path_names_the_target_of_a_failed_write(tmp_path):
    """A full disk inside the block (an OSError, or a Rust writer's error carrying the errno)
    is an OSError naming the file meant, and leaves nothing behind."""
    import errno

    target = tmp_path / "out" / "column.safetensors"
    for fault in (
        OSError(errno.ENOSPC, "No space left on device", "elsewhere"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ):
        with pytest.raises(OSError) as caught, atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            if isinstance(fault, OSError):
                fault.filename = str(tmp)
            raise fault
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert list((tmp_path / "out").iterdir()) == []


def test_the_cli_says_each_os_fault_in_one_sentence():
    import errno

    from rsrouter.cli.app import os_error_sentence

    def say(code, name="/ws/x.json", text=None):
        return os_error_sentence(OSError(code, text or os.strerror(code), name))

    assert say(errno.ENOSPC) == (
        "no space left on the device while writing /ws/x.json; free some space and run the "
        "command again (the work already saved is kept)."
    )
    assert say(errno.EROFS).startswith("cannot write /ws/x.json: the file system is read-only;")
    assert say(errno.EACCES).startswith("permission denied for /ws/x.json;")
    assert say(errno.ENOENT) == "/ws/x.json does not exist."
    assert "broken pipe" in say(errno.EPIPE, None)
    network = os_error_sentence(ConnectionError("Max retries exceeded with url: /api"))
    assert network.startswith("Max retries exceeded with url: /api (ConnectionError); check the")
    assert all("\n" not in say(c) for c in (errno.EIO, errno.EMFILE, errno.ENOSPC))
