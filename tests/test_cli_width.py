"""What the CLI prints reads the same at any terminal width and any temp-path length: commands,
paths and hashes a user may copy are never broken, tables never fold a cell letter by letter,
help texts keep their bracketed TOML table names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from helpers import small_cnn_expert

WIDTHS = [40, 80, 200]


def router(args: list[str], columns: int, cwd) -> subprocess.CompletedProcess:
    """`router ARGS` in a fresh process whose terminal is ``columns`` wide, output piped."""
    env = {**os.environ, "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rsrouter.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A folder whose path is long enough to cross any terminal edge, with exported weights."""
    root = tmp_path_factory.mktemp("w") / ("a-rather-long-folder-name-" * 4).rstrip("-")
    root.mkdir()
    expert = small_cnn_expert(0.75, seed=0)
    save_file(expert.classifier.state_dict(), root / "w.safetensors")
    return root


@pytest.mark.parametrize("columns", WIDTHS)
def test_suggested_commands_and_tables_never_wrap(deep, columns):
    out_dir = deep / f"expert-{columns}"
    options = "--arch small_cnn --sigma 0.75 --num-classes 3 --in-chans 1 --input-size 8"
    options = [*options.split(), "--arch-arg", "width=2", "--mean", "0", "--std", "1"]
    done = router(
        ["export-expert", str(deep / "w.safetensors"), str(out_dir), *options], columns, deep
    )
    assert done.returncode == 0, done.stderr
    hint = f"router add-expert {out_dir} --sigma 0.75"
    assert hint in done.stdout.splitlines()[-1], done.stdout  # whole, on one line

    ws = deep / f"ws-{columns}"
    assert router(["init", str(ws)], columns, deep).returncode == 0
    name = "an-expert-with-a-long-name-for-the-table"
    done = router(["add-expert", str(out_dir), "--sigma", "0.75", "--name", name, "-w", str(ws)],
                  columns, deep)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(ws / "router.toml") in done.stdout
    listing = router(["experts", "-w", str(ws)], columns, deep)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if name in line)
    assert str(out_dir) in row  # the source column is whole, not folded letter by letter


@pytest.mark.parametrize("columns", [40])
def test_errors_and_help_keep_what_the_user_needs(deep, columns):
    missing = deep / "no-such-expert-folder"
    ws = deep / f"ws-err-{columns}"
    assert router(["init", str(ws)], columns, deep).returncode == 0
    done = router(["add-expert", str(missing), "--sigma", "0.5", "-w", str(ws)], columns, deep)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    helped = router(["init", "--help"], columns, deep)
    assert "[data]" in helped.stdout
    helped = router(["train", "--help"], columns, deep)
    assert "[train]" in " ".join(helped.stdout.split())
