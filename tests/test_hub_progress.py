"""Hub downloads draw their progress with rich, like every other long step, never with tqdm."""

from __future__ import annotations

import io

from huggingface_hub import HfApi
from rich.console import Console

import rsrouter.progress
from helpers import small_cnn_expert
from rsrouter.experts.expert import fetch_snapshot

pytest_plugins = ["hub_server"]  # the `hub` fixture: a loopback Hub test double


def test_hub_downloads_show_rich_bars_and_no_tqdm(hub, tmp_path, monkeypatch, capfd):
    api = HfApi(endpoint=hub.endpoint, token="t")
    small_cnn_expert(0.25).save_pretrained(tmp_path / "e")
    api.create_repo("org/e")
    api.upload_folder(repo_id="org/e", folder_path=tmp_path / "e")
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, markup=False)
    monkeypatch.setattr(rsrouter.progress, "HUB_CONSOLE", terminal)
    capfd.readouterr()
    folder, commit = fetch_snapshot("org/e", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert (folder / "model.safetensors").is_file() and len(commit) == 40
    drawn = screen.getvalue()
    assert "org/e: Fetching" in drawn and "Download complete" in drawn  # our bars
    out, err = capfd.readouterr()
    assert "it/s" not in out + err and "Fetching" not in out + err  # no tqdm anywhere
    # offline from the cache: nothing to download, nothing drawn
    screen.truncate(0)
    fetch_snapshot("org/e", cache_dir=tmp_path / "c", local_files_only=True)
    assert "Fetching" not in screen.getvalue()
