"""rsrouter.experts.Expert: folders, fingerprints, Hub cache, refusals, checkpoint conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

import helpers
from rsrouter.errors import UsageError
from rsrouter.experts import Expert, ExpertConfig, build_classifier
from rsrouter.experts.convert import convert_checkpoint, export_expert
from rsrouter.experts.nets import normalize

SHAPE = dict(num_classes=3, in_chans=1, input_size=(8, 8))


def tiny_expert(sigma=0.25, seed=0, **fields) -> Expert:
    return helpers.small_cnn_expert(sigma, seed=seed, **SHAPE, **fields).eval()


def tiny_unet():
    from diffusers import DDPMScheduler

    return helpers.tiny_unet(), DDPMScheduler(num_train_timesteps=1000)


def test_folder_round_trip_keeps_outputs_and_fingerprint(tmp_path):
    expert = tiny_expert(mean=[0.3], std=[0.2], class_names=["a", "b", "c"], dataset="toy")
    x = torch.rand(4, 1, 8, 8)
    folder = expert.save_pretrained(tmp_path / "e")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["sigma"] == 0.25 and config["kind"] == "classifier"
    assert config["format_version"] == 1 and config["class_names"] == ["a", "b", "c"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: rsrouter" in card and "σ = 0.25" in card
    loaded = Expert.from_pretrained(folder)
    assert torch.equal(loaded(x), expert(x))
    assert loaded.fingerprint == expert.fingerprint
    assert (loaded.sigma, loaded.num_classes, loaded.input_shape) == (0.25, 3, (1, 8, 8))
    assert len(expert.fingerprint) == 64


def test_normalisation_is_inside_after_the_noise():
    expert = tiny_expert(mean=[0.3], std=[0.2])
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(expert(x), expert.classifier(normalize(x, [0.3], [0.2])))
    assert not torch.allclose(expert(x), expert.classifier(x))


def test_fingerprint_follows_weights_and_sigma(tmp_path):
    a, b = tiny_expert(seed=0), tiny_expert(seed=1)
    assert a.fingerprint != b.fingerprint
    assert tiny_expert(seed=0).fingerprint == a.fingerprint  # same weights, same hash
    before = a.fingerprint
    with torch.no_grad():
        a.classifier.fc.bias.add_(1.0)  # an in-place change is noticed
    assert a.fingerprint != before
    assert tiny_expert(sigma=0.5).fingerprint != tiny_expert(sigma=0.25).fingerprint


def test_refusals_are_one_sentence(tmp_path):
    expert = tiny_expert()
    folder = expert.save_pretrained(tmp_path / "e")
    with pytest.raises(UsageError, match="trained at sigma=0.25, not 0.5"):
        Expert.from_pretrained(folder, sigma=0.5)
    # unknown architecture
    config = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text(json.dumps({**config, "arch": "no_such_net_xyz"}))
    with pytest.raises(UsageError, match="unknown architecture 'no_such_net_xyz'"):
        Expert.from_pretrained(bad)
    # a newer format
    (bad / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UsageError, match="upgrade rsrouter"):
        Expert.from_pretrained(bad)
    # weights of another architecture
    (bad / "config.json").write_text(json.dumps({**config, "arch_args": {"width": 3}}))
    with pytest.raises(UsageError, match="not fit architecture"):
        Expert.from_pretrained(bad)
    # a pickle-only folder
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save(expert.classifier.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UsageError, match="only pickle checkpoints.*convert-checkpoint"):
        Expert.from_pretrained(pickled)
    with pytest.raises(UsageError, match="not fit architecture"):
        Expert.from_module(
            build_classifier("small_cnn", 3, 1, width=4), sigma=0.25, arch="small_cnn", **SHAPE
        )
    with pytest.raises(UsageError, match="sigma must be a positive"):
        ExpertConfig(kind="classifier", sigma=-1.0, arch="small_cnn", **SHAPE)


def test_hub_cache_offline_and_missing_repo(tmp_path, monkeypatch):
    expert = tiny_expert()
    folder = expert.save_pretrained(tmp_path / "e")
    cache = tmp_path / "cache"
    helpers.fill_hub_cache(cache, "org/tiny", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = Expert.from_pretrained("org/tiny", cache_dir=cache)
    assert loaded.fingerprint == expert.fingerprint
    with pytest.raises(UsageError, match="'org/absent'.*not in the local cache"):
        Expert.from_pretrained("org/absent", cache_dir=cache)


def test_denoised_folder_serves_several_sigma(tmp_path):
    classifier = tiny_expert(sigma=0)  # trained on clean images: bound to no sigma
    assert classifier.config.sigma is None
    with pytest.raises(UsageError, match="bound to no sigma"):
        classifier.sigma  # noqa: B018
    unet, scheduler = tiny_unet()
    expert = Expert.from_parts(classifier.config, classifier.classifier, unet, scheduler, sigma=0.5)
    folder = expert.save_pretrained(tmp_path / "d")
    assert (folder / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "denoiser" / "scheduler_config.json").is_file()
    x = torch.rand(2, 1, 8, 8)
    at_half = Expert.from_pretrained(folder)
    assert torch.allclose(at_half(x), expert(x), atol=1e-6)
    assert at_half.fingerprint == expert.fingerprint
    at_one = Expert.from_pretrained(folder, sigma=1.0)
    assert at_one.sigma == 1.0 and at_one.denoiser.timestep > at_half.denoiser.timestep
    assert at_one.fingerprint != at_half.fingerprint
    assert at_half.with_sigma(1.0).fingerprint == at_one.fingerprint
    # a larger classifier input: the denoised image is resized before classification
    big = tiny_expert(sigma=0)
    big.config.input_size = [16, 16]
    resized = Expert.from_parts(big.config, big.classifier, unet, scheduler, sigma=0.25)
    assert resized.input_shape == (1, 8, 8) and resized(x).shape == (2, 3)


def test_convert_checkpoint_and_export(tmp_path):
    expert = tiny_expert()
    x = torch.rand(2, 1, 8, 8)
    wrapped = {f"module.{k}": v for k, v in expert.classifier.state_dict().items()}
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": wrapped}, ckpt)
    common = dict(arch="small_cnn", arch_args={"width": 2}, sigma=0.25, **SHAPE)
    with pytest.raises(UsageError, match="does not record its input normalisation"):
        convert_checkpoint(ckpt, tmp_path / "converted", **common)  # never defaulted to 0/1
    common.update(mean=[0.0], std=[1.0])
    folder = convert_checkpoint(ckpt, tmp_path / "converted", **common)
    assert torch.equal(Expert.from_pretrained(folder)(x), expert(x))
    # a pickle with Python objects beyond tensors is refused, never unpickled
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": wrapped, "extra": Path("/etc")}, evil)
    with pytest.raises(UsageError, match="holds Python objects.*weights_only=True"):
        convert_checkpoint(evil, tmp_path / "no", **common)
    assert not (tmp_path / "no").exists()
    # export-expert reads safetensors only
    from safetensors.torch import save_file

    save_file(expert.classifier.state_dict(), tmp_path / "w.safetensors")
    out = export_expert(tmp_path / "w.safetensors", tmp_path / "exported", **common)
    assert Expert.from_pretrained(out).fingerprint == expert.fingerprint
    with pytest.raises(UsageError, match="pickle checkpoint.*convert-checkpoint"):
        export_expert(ckpt, tmp_path / "x", **common)


def test_export_and_convert_commands_share_the_expert_options(tmp_path, capsys):
    """Both commands take the same expert options and write what the functions write."""
    from safetensors.torch import save_file

    import rsrouter.cli.experts  # noqa: F401  (registers the commands)
    from rsrouter.cli.app import run

    expert = tiny_expert()
    state = {f"m.{k}": v for k, v in expert.classifier.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"sd": state}, tmp_path / "w.pt")
    options = ["--arch", "small_cnn", "--sigma", "0.5", "--num-classes", "3", "--in-chans", "1",
               "--input-size", "8", "--arch-arg", "width=2", "--mean", "0.3", "--std", "0.2",
               "--class-names", "a, b,c", "--dataset", "toy", "--license", "mit",
               "--strip-prefix", "m."]  # fmt: skip
    fields = dict(arch="small_cnn", sigma=0.5, num_classes=3, in_chans=1, input_size=[8, 8],
                  arch_args={"width": 2}, mean=[0.3], std=[0.2], class_names=["a", "b", "c"],
                  dataset="toy", license="mit", strip_prefix="m.")  # fmt: skip
    assert (
        run(["export-expert", str(tmp_path / "w.safetensors"), str(tmp_path / "e1"), *options]) == 0
    )
    assert "router add-expert" in capsys.readouterr().out
    export_expert(tmp_path / "w.safetensors", tmp_path / "e2", **fields)
    cmd = ["convert-checkpoint", str(tmp_path / "w.pt"), str(tmp_path / "c1"), *options]
    assert run([*cmd, "--key", "sd"]) == 0
    convert_checkpoint(tmp_path / "w.pt", tmp_path / "c2", key="sd", **fields)
    for a, b in (("e1", "e2"), ("c1", "c2")):
        assert json.loads((tmp_path / a / "config.json").read_text()) == json.loads(
            (tmp_path / b / "config.json").read_text()
        )
        loaded = Expert.from_pretrained(tmp_path / a)
        assert loaded.fingerprint == Expert.from_pretrained(tmp_path / b).fingerprint
        assert loaded.sigma == 0.5 and loaded.config.class_names == ["a", "b", "c"]
    assert run(["export-expert", str(tmp_path / "w.safetensors"), str(tmp_path / "x"),
                *options[:8], "--input-size", "8x"]) == 1  # fmt: skip
    assert "--input-size must be H or H,W" in capsys.readouterr().err


def test_bad_command_line_input_is_one_sentence(tmp_path, capsys):
    """Wrong architecture arguments, a corrupt checkpoint, an output that is a file."""
    from safetensors.torch import save_file

    import rsrouter.cli.experts  # noqa: F401  (registers the commands)
    from rsrouter.cli.app import run

    with pytest.raises(UsageError, match="'small_cnn' cannot be built.*'depth'"):
        build_classifier("small_cnn", 3, 1, depth=3)
    save_file(tiny_expert().classifier.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    options = ["--arch", "small_cnn", "--sigma", "0.25", "--num-classes", "3", "--in-chans", "1",
               "--input-size", "8", "--arch-arg", "width=2", "--mean", "0",
               "--std", "1"]  # fmt: skip
    cases = {
        ("export-expert", "w.safetensors", "out", "--arch-arg", "width=abc"): "cannot be built",
        ("convert-checkpoint", "junk.pt", "out"): "junk.pt is not a PyTorch checkpoint",
        ("export-expert", "w.safetensors", "junk.pt"): "junk.pt is a file",
        ("export-expert", "w.safetensors", "junk.pt/sub"): "cannot create the folder",
        ("convert-checkpoint", ".", "out"): "is a folder without config.json",
    }
    for (cmd, src, out, *extra), message in cases.items():
        argv = [cmd, str(tmp_path / src), str(tmp_path / out), *options, *extra]
        assert run(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "junk.pt").read_bytes() == b"junk"
