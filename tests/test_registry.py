"""The workspace registry and its CLI: pinned, hash-verified experts from folders and the Hub."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi

import rsrouter.cli.experts  # noqa: F401  (registers the commands)
from helpers import fill_hub_cache, small_cnn_expert, tiny_unet
from rsrouter.cli.app import run
from rsrouter.errors import UsageError
from rsrouter.registry import Workspace
from rsrouter.registry.toml import dumps

pytest_plugins = ["hub_server"]  # the `hub` fixture: a loopback Hub test double


def save_expert(folder: Path, sigma=0.25, seed=0, num_classes=3, size=8) -> Path:
    expert = small_cnn_expert(sigma, num_classes=num_classes, input_size=size, seed=seed)
    return expert.save_pretrained(folder)


def save_denoiser(folder: Path) -> Path:
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def test_cli_in_a_fresh_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells on a narrow terminal
    folder = save_expert(tmp_path / "experts" / "small", sigma=0.25)
    assert run(["init"]) == 0
    assert run(["add-expert", "experts/small", "--sigma", "0.25", "--name", "s25"]) == 0
    out = capsys.readouterr().out
    assert "added expert 's25'" in out and "router.toml" in out
    assert run(["experts", "--verify"]) == 0
    out = capsys.readouterr().out
    weights_sha = Workspace.open().entry("s25").sha256["model.safetensors"]
    assert "s25" in out and weights_sha[:12] in out and "verified" in out
    doc = tomllib.loads((tmp_path / "router.toml").read_text())
    assert doc["experts"][0]["source"] == "experts/small"  # inside the workspace: relative
    assert doc["experts"][0]["sha256"]["model.safetensors"] == weights_sha
    # a tampered weight file is refused, with one sentence and exit status 1
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(raw))
    assert run(["experts", "--verify"]) == 1
    err = capsys.readouterr().err
    assert "error: expert 's25': model.safetensors does not match the sha256" in err
    assert "re-add it" in err and "Traceback" not in err
    # a pickle checkpoint is refused too
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save({"w": torch.ones(1)}, pickled / "model.pt")
    assert run(["add-expert", str(pickled), "--sigma", "0.25"]) == 1
    err = capsys.readouterr().err
    assert "only pickle checkpoints (model.pt)" in err and "convert-checkpoint" in err
    assert run(["remove-expert", "s25"]) == 0
    assert Workspace.open().experts == []
    assert run(["remove-expert", "s25"]) == 1
    assert run(["init"]) == 1  # the workspace exists already


def test_add_checks(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    a = save_expert(tmp_path / "a", sigma=0.25)
    ws.add_expert(a, 0.25, name="a")
    with pytest.raises(UsageError, match="already registered"):
        ws.add_expert(a, 0.25, name="a")
    with pytest.raises(UsageError, match="4 classes but 'a' has 3"):
        ws.add_expert(save_expert(tmp_path / "k4", num_classes=4), 0.25, name="k4")
    with pytest.raises(UsageError, match=r"takes inputs \(1, 16, 16\)"):
        ws.add_expert(save_expert(tmp_path / "big", size=16), 0.25, name="big")
    with pytest.raises(UsageError, match="sigma must be a positive"):
        ws.add_expert(a, 0.0, name="zero")
    with pytest.raises(UsageError, match="bound to one sigma"):
        ws.add_expert(a, [0.25, 0.5])
    with pytest.raises(UsageError, match="expert name"):
        ws.add_expert(a, 0.25, name="bad name!")
    with pytest.raises(UsageError, match="neither a folder nor a Hub repo"):
        ws.add_expert(tmp_path / "missing", 0.25)
    bad = tmp_path / "unknown-arch"
    shutil.copytree(a, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "arch": "no_such_net_xyz"}))
    with pytest.raises(UsageError, match="unknown architecture"):
        ws.add_expert(bad, 0.25, name="u")
    assert Workspace.open(ws.root).names == ["a"]  # nothing half-added


def test_denoised_at_several_sigma_and_human_edits(tmp_path):
    ws = Workspace.init(tmp_path / "ws", dataset="fashion-mnist-subset")
    clean = save_expert(tmp_path / "clean", sigma=0)
    den = save_denoiser(tmp_path / "den")
    entries = ws.add_expert(clean, [0.25, 0.5, 1.0], denoiser=den, name="dds")
    assert [e.name for e in entries] == ["dds-sigma0.25", "dds-sigma0.5", "dds-sigma1"]
    assert set(entries[0].sha256) == {
        "config.json",
        "model.safetensors",
        "denoiser/unet/config.json",
        "denoiser/unet/diffusion_pytorch_model.safetensors",
        "denoiser/scheduler/scheduler_config.json",
    }
    experts = Workspace.open(ws.root).load_experts()
    assert [e.sigma for e in experts.values()] == [0.25, 0.5, 1.0]
    assert len({e.fingerprint for e in experts.values()}) == 3
    assert experts["dds-sigma1"].denoiser.unet is experts["dds-sigma0.25"].denoiser.unet
    assert experts["dds-sigma1"](torch.rand(2, 1, 8, 8)).shape == (2, 3)
    # a human edit of router.toml: a new sigma and a settings table
    text = ws.path.read_text().replace("sigma = 1.0", "sigma = 0.75", 1)
    ws.path.write_text(text + "\n[tables]\nn = 100\nalpha = 0.001\n")
    edited = Workspace.open(ws.root)
    assert edited.load_expert("dds-sigma1").sigma == 0.75
    assert edited.settings("tables") == {"n": 100, "alpha": 0.001}
    assert edited.settings("data") == {"dataset": "fashion-mnist-subset"}
    assert edited.settings("train") == {}
    assert edited.artifacts == ws.root / ".rsrouter"
    # a changed denoiser file is caught
    weights = den / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(UsageError, match="denoiser/unet/diffusion_pytorch_model.safetensors"):
        edited.load_expert("dds-sigma0.5")


def test_hub_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fill_hub_cache(cache, "org/cached", save_expert(tmp_path / "e"), commit="c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ws = Workspace.init(tmp_path / "ws")
    (entry,) = ws.add_expert("org/cached", 0.25, cache_dir=cache)
    assert entry.commit == "c" * 40 and entry.cache_dir == str(cache)
    assert Workspace.open(ws.root).load_expert(entry.name).sigma == 0.25
    with pytest.raises(UsageError, match="'org/missing'.*not in the local cache"):
        ws.add_expert("org/missing", 0.25, cache_dir=cache)


def test_loopback_hub_round_trip_is_pinned(tmp_path, hub, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/expert")
    first = api.upload_folder(
        folder_path=save_expert(tmp_path / "v1", seed=0), repo_id="org/expert"
    )
    ws = Workspace.init(tmp_path / "ws")
    cache = tmp_path / "cache"
    argv = ["add-expert", "org/expert", "--sigma", "0.25", "--name", "hub25"]
    argv += ["--endpoint", hub.endpoint, "--cache-dir", str(cache), "-w", str(ws.root)]
    assert run(argv) == 0
    entry = Workspace.open(ws.root).entry("hub25")
    assert entry.commit == first.oid and entry.endpoint == hub.endpoint
    v1 = Workspace.open(ws.root).load_expert("hub25").fingerprint
    # main moves on; the registered expert stays at its commit
    api.upload_folder(folder_path=save_expert(tmp_path / "v2", seed=1), repo_id="org/expert")
    assert Workspace.open(ws.root).load_expert("hub25").fingerprint == v1
    (latest,) = ws.add_expert("org/expert", 0.25, name="latest", endpoint=hub.endpoint)
    assert latest.commit != first.oid
    # an old revision by hash, and a diffusers denoiser repo at two sigma
    (old,) = ws.add_expert(
        "org/expert", 0.25, name="old", revision=first.oid, endpoint=hub.endpoint
    )
    assert old.commit == first.oid and old.revision == first.oid
    api.create_repo("org/denoiser")
    api.upload_folder(folder_path=save_denoiser(tmp_path / "den"), repo_id="org/denoiser")
    api.create_repo("org/clean")
    api.upload_folder(folder_path=save_expert(tmp_path / "clean", sigma=0), repo_id="org/clean")
    argv = ["add-expert", "--classifier", "org/clean", "--denoiser", "org/denoiser"]
    argv += ["--sigma", "0.5,1.0", "--endpoint", hub.endpoint, "-w", str(ws.root)]
    assert run(argv) == 0
    experts = Workspace.open(ws.root).load_experts()
    assert [e.sigma for e in experts.values()][-2:] == [0.5, 1.0]
    assert run(["experts", "-w", str(ws.root)]) == 0
    assert first.oid[:12] in capsys.readouterr().out
    # a missing repo on a reachable Hub
    with pytest.raises(UsageError, match="'org/nope' does not exist"):
        ws.add_expert("org/nope", 0.25, endpoint=hub.endpoint)
    # tampering with the cached blob is caught on the next load
    blob = next((cache / "models--org--expert" / "blobs").iterdir())
    for blob in (cache / "models--org--expert" / "blobs").iterdir():
        if blob.stat().st_size > 1000:
            blob.write_bytes(blob.read_bytes()[:-1] + b"\1")
    with pytest.raises(UsageError, match="does not match the sha256"):
        Workspace.open(ws.root).load_expert("hub25")


def test_a_hub_denoiser_published_as_a_pickle_gets_a_hint_that_converts_it(
    tmp_path, hub, capsys, monkeypatch
):
    """A revision with only diffusion_pytorch_model.bin (google/ddpm-cifar10-32 in 2022): the
    refusal prints a `router convert-denoiser` command that, pasted, writes a folder that
    add-expert takes."""
    from diffusers import DDPMScheduler

    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/ddpm")
    tiny_unet().save_pretrained(tmp_path / "bin", safe_serialization=False)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "bin")
    commit = api.upload_folder(folder_path=tmp_path / "bin", repo_id="org/ddpm").oid
    ws = Workspace.init(tmp_path / "ws")
    clean = save_expert(tmp_path / "clean", sigma=0)
    argv = ["add-expert", "--classifier", str(clean), "--sigma", "0.5", "-w", str(ws.root)]
    hub_args = ["--denoiser-revision", commit, "--endpoint", hub.endpoint]
    capsys.readouterr()
    assert run([*argv, "--denoiser", "org/ddpm", *hub_args]) == 1
    err = capsys.readouterr().err
    assert f"org/ddpm at revision {commit} has no diffusion_pytorch_model.safetensors" in err
    hint = err.split("`")[1]
    assert hint.startswith("router convert-denoiser org/ddpm ddpm-safetensors --format diffusers")
    monkeypatch.chdir(tmp_path)
    assert run(hint.split()[1:]) == 0
    assert run([*argv, "--denoiser", str(tmp_path / "ddpm-safetensors")]) == 0
    assert Workspace.open(ws.root).load_experts()


def test_toml_writer_round_trips():
    doc = {
        "artifacts": ".rsrouter",
        "data": {"dataset": 'a "quoted" name', "n": 3, "x": 1e-5, "ok": True, "l": [1, 2.5]},
        "experts": [
            {"name": "a", "sigma": 0.25, "sha256": {"denoiser/config.json": "ab"}},
            {"name": "b", "sigma": 1.0, "sha256": {}},
        ],
        # hand-written settings deeper than one sub-table survive add-expert's rewrite
        "router": {"arch_args": {"a": {"b": 1}}, "runs": [{"c": 2, "d": {"e": 3}}]},
    }
    assert tomllib.loads(dumps(doc, "header\nlines")) == doc


def test_router_toml_keeps_comments_and_layout_through_every_rewrite(tmp_path):
    """add-expert, remove-expert and a saved setting edit router.toml in place."""
    root = tmp_path / "ws"
    Workspace.init(root)
    ws = Workspace.open(root)
    ws.add_expert(save_expert(tmp_path / "e1", 0.25, seed=1), 0.25, name="first")
    text = (root / "router.toml").read_text()
    hand = text.replace(
        'name = "first"', '# my favourite expert\nname   =   "first"  # keep me'
    ).replace("[data]", "# where the images come from\n[data]")
    hand += "\n# settings of the certify step\n[certify]\nn = 500      # quick runs\nalpha = 1e-3\n"
    (root / "router.toml").write_text(hand)

    ws = Workspace.open(root)
    ws.add_expert(save_expert(tmp_path / "e2", 0.5, seed=2), 0.5, name="second")
    ws.add_expert(save_expert(tmp_path / "e3", 1.0, seed=3), 1.0, name="third")
    ws.update_settings("tables", n=50)  # what `router tables --n 50` saves for `router train`
    ws.remove_expert("second")
    text = (root / "router.toml").read_text()
    for kept in (
        '# my favourite expert\nname   =   "first"  # keep me',
        "# where the images come from\n[data]",
        "# settings of the certify step\n[certify]\nn = 500      # quick runs\nalpha = 1e-3\n",
    ):
        assert kept in text
    assert text.startswith(hand.split("[[experts]]")[0])  # header and first tables untouched
    doc = tomllib.loads(text)
    assert [e["name"] for e in doc["experts"]] == ["first", "third"]
    assert doc["tables"] == {"n": 50} and doc["certify"] == {"n": 500, "alpha": 0.001}
    ws = Workspace.open(root)
    assert ws.names == ["first", "third"] and ws.load_expert("third").sigma == 1.0
    ws.update_settings("certify", n=100)  # a changed value is replaced, its comment kept
    assert "n = 100      # quick runs" in (root / "router.toml").read_text()


def test_unreachable_hub_names_the_repo(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    with pytest.raises(UsageError, match="'org/far-away'.*cannot be reached"):
        ws.add_expert("org/far-away", 0.25, endpoint="http://127.0.0.1:9", cache_dir=tmp_path)


def test_settings_over_defaults_refuses_unknown_keys(tmp_path):
    from rsrouter.composition.certify_run import certify_settings
    from rsrouter.router.tables import TABLE_DEFAULTS, table_settings

    ws = Workspace.init(tmp_path)
    ws.update_settings("tables", n=50)
    s = table_settings(ws, n=None, alpha=0.01)
    assert s == {**TABLE_DEFAULTS, "n": 50, "alpha": 0.01}
    ws.update_settings("certify", nn=5)
    with pytest.raises(UsageError, match=r"unknown \[certify\] setting\(s\) in .*: nn\."):
        certify_settings(ws)


def test_a_malformed_workspace_file_is_one_sentence(tmp_path, capsys):
    """Hand edits of router.toml: wrong types are named, and TOML brackets survive printing."""
    (tmp_path / "afile").write_text("")
    assert run(["init", str(tmp_path / "afile")]) == 1
    assert "cannot create the workspace folder" in capsys.readouterr().err
    assert run(["init", str(tmp_path / "w0"), "--dataset", "imagenet-99"]) == 1
    assert "unknown dataset 'imagenet-99'" in capsys.readouterr().err
    assert not (tmp_path / "w0").exists()
    ws = tmp_path / "ws"
    ws.mkdir()
    entry = 'name = "a"\nsource = "x"\nkind = "classifier"\n'
    cases = {
        "experts = [1]\n": "experts must be [[experts]] tables.",
        f"[[experts]]\n{entry}sigma = 'abc'\n": "expert 'a': sigma must be a positive",
        f"[[experts]]\n{entry}sigma = 0\n": "expert 'a': sigma must be a positive",
        f"[[experts]]\n{entry}sigma = 1\nsha256 = 'x'\n": "sha256 must be a table",
        f"[[experts]]\n{entry}sigma = 1\nparameters = '9'\n": "malformed parameters",
        '[[experts]]\nname = "a"\nsource = 3\nkind = "classifier"\nsigma = 1\n': "malformed source",
    }
    for text, message in cases.items():
        (ws / "router.toml").write_text(text)
        assert run(["experts", "-w", str(ws)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    # a bad command line is one sentence too (click's own errors, exit status 2)
    assert run(["experts", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err == "error: No such option: --bogus; see `router experts --help`.\n"
