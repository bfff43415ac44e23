"""The loopback Hub test double answers the real huggingface_hub client like the Hub does."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytest_plugins = ["hub_server"]  # the `hub` fixture: a loopback Hub test double


def _folder(root: Path, text: str) -> Path:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(text)
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    return root


def test_round_trip_keeps_every_revision(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    api.create_repo("org/model", exist_ok=True)  # second call is a no-op, as on the Hub
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError):
        api.create_repo("org/model")

    folder = _folder(tmp_path / "src", '{"v": 1}')
    first = api.upload_folder(repo_id="org/model", folder_path=folder).oid
    (folder / "config.json").write_text('{"v": 2}')
    second = api.upload_folder(repo_id="org/model", folder_path=folder).oid
    assert first != second
    assert sorted(api.list_repo_files("org/model")) == [
        ".gitattributes",
        "config.json",
        "sub/weights.bin",
    ]
    assert api.model_info("org/model").sha == second

    cache = tmp_path / "cache"
    old = Path(
        snapshot_download("org/model", revision=first, endpoint=hub.endpoint, cache_dir=cache)
    )
    new = Path(snapshot_download("org/model", endpoint=hub.endpoint, cache_dir=cache))
    assert old.name == first and (old / "config.json").read_text() == '{"v": 1}'
    assert new.name == second and (new / "config.json").read_text() == '{"v": 2}'
    assert (new / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 4

    # Offline, the cached snapshot of the branch is found without any request.
    seen = len(hub.requests)
    offline = snapshot_download("org/model", cache_dir=cache, local_files_only=True)
    assert Path(offline) == new and len(hub.requests) == seen
    assert not hub.unhandled


def test_deleting_a_file_makes_a_new_commit(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    folder = _folder(tmp_path / "src", "{}")
    first = api.upload_folder(repo_id="org/model", folder_path=folder).oid
    api.delete_file("config.json", repo_id="org/model")
    assert "config.json" not in api.list_repo_files("org/model")
    assert "config.json" in api.list_repo_files("org/model", revision=first)


def test_errors_are_the_clients_own(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", endpoint=hub.endpoint, cache_dir=cache)
    api.create_repo("org/model")
    api.upload_folder(repo_id="org/model", folder_path=_folder(tmp_path / "src", "{}"))
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/model", revision="0" * 40, endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/model", "nope.txt", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("org/other", cache_dir=cache, local_files_only=True)


def test_private_repo_and_writes_need_a_token(hub, tmp_path):
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="401"):
        HfApi(endpoint=hub.endpoint, token=False).create_repo("org/secret")
    HfApi(endpoint=hub.endpoint, token="hf_test").create_repo("org/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("org/secret")
    info = HfApi(endpoint=hub.endpoint, token="hf_test").model_info("org/secret")
    assert info.private


def test_dropped_commit_no_longer_resolves(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    first = api.upload_folder(repo_id="org/model", folder_path=_folder(tmp_path / "a", "1")).oid
    api.upload_folder(repo_id="org/model", folder_path=_folder(tmp_path / "a", "2"))
    hub.drop_commit("org/model", first)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision=first)


def test_branches_hold_their_own_head(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    main = api.upload_folder(repo_id="org/model", folder_path=_folder(tmp_path / "a", "main")).oid
    api.create_branch("org/model", branch="v1", exist_ok=True)
    api.create_branch("org/model", branch="v1", exist_ok=True)
    v1 = api.upload_folder(
        repo_id="org/model", folder_path=_folder(tmp_path / "a", "v1"), revision="v1"
    ).oid
    assert api.model_info("org/model").sha == main
    assert api.model_info("org/model", revision="v1").sha == v1
    path = hf_hub_download(
        "org/model",
        "config.json",
        revision="v1",
        endpoint=hub.endpoint,
        cache_dir=tmp_path / "cache",
    )
    assert Path(path).read_text() == "v1"


def test_readme_metadata_is_validated(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    folder = _folder(tmp_path / "a", "{}")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    api.upload_folder(repo_id="org/model", folder_path=folder)
    (folder / "README.md").write_text("---\nlicense: [mit\n---\n# card\n")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_folder(repo_id="org/model", folder_path=folder)
