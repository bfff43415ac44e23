"""The bad-input matrix: every fault a user or the machine can cause, through the `router` CLI.

Each case asserts the exit status, ONE line on stderr starting with "error: " that names the
cause, and a workspace whose every file has the same bytes before and after. One tiny workspace
(an 8x8 three-class ImageFolder, two small experts, tables, a router and a certified run) is
built once for the module; a case that needs to change it first works on a copy.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import small_cnn_expert
from rsrouter.cli.main import run

CLASSES = ["cat", "dog", "eel"]


def image_folder(root: Path, classes: list[str], per_class: int = 6, size: int = 8) -> Path:
    """root/{train,test}/<class>/*.png: each class a brightness, with a little noise."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                level = 40 + 80 * c + rng.integers(0, 20, size=(size, size, 3))
                Image.fromarray(level.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def expert_folder(folder: Path, sigma: float, **fields) -> Path:
    fields = {"num_classes": 3, "class_names": CLASSES, **fields}
    small_cnn_expert(sigma, in_chans=3, input_size=(8, 8), seed=0, **fields).save_pretrained(folder)
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A certified workspace: experts inside it (so a copy is whole), tables, router, a run."""
    from rsrouter.registry import Workspace

    root = tmp_path_factory.mktemp("bad-input")
    data = image_folder(root / "data", CLASSES)
    ws = Workspace.init(root / "ws", dataset=str(data))
    for sigma in (0.25, 0.5):
        folder = expert_folder(ws.root / "experts" / f"e{sigma}", sigma)
        ws.add_expert(folder, sigma, name=f"e{sigma}")
    ws.update_settings("tables", n=32, batch_size=256)
    ws.update_settings("router", arch="small_cnn", arch_args={"width": 4})  # experts: 2
    ws.update_settings("train", epochs=1, batch_size=8)
    ws.update_settings("certify", n0=4, n=16, limit=3, batch_size=256)
    for command in ("tables", "train", "certify"):
        assert run([command, "-w", str(ws.root), "--device", "cpu"]) == 0, command
    return ws.root


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A copy of the certified workspace, for a case that must change it first."""
    return Path(shutil.copytree(base, tmp_path / "ws"))


def refused(capsys, argv, workspace: Path, match: str, *, code: int = 1) -> str:
    """Run ``argv``; assert the status, one "error: " line matching ``match``, and that no file
    under ``workspace`` changed."""
    capsys.readouterr()
    before = snapshot(workspace)
    status = run([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(workspace) == before
    return lines[0]


def unwritable(monkeypatch, root: Path, code: int) -> None:
    """Make every write under ``root`` fail with ``code`` (EROFS: a read-only folder; ENOSPC:
    a full disk), whoever is running the tests (root ignores file modes)."""
    root = Path(root).resolve()
    strerror = os.strerror(code)

    def under(path) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(root)
        except TypeError:  # a file descriptor
            return False

    def guard(original, writes=lambda *a, **k: True):
        def wrapped(path, *args, **kwargs):
            if under(path) and writes(path, *args, **kwargs):
                raise OSError(code, strerror, os.fspath(path))
            return original(path, *args, **kwargs)

        return wrapped

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def open_writes(path, mode="r", *args, **kwargs):
        return any(c in mode for c in "wax+")

    monkeypatch.setattr(builtins, "open", guard(builtins.open, open_writes))
    monkeypatch.setattr(io, "open", guard(io.open, open_writes))
    monkeypatch.setattr(os, "open", guard(os.open, lambda p, flags, *a, **k: flags & write_flags))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, lambda p, *a, **k: not os.path.exists(p)))
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    return path


# ---------------------------------------------------------------- certify, report


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--n", "0"], r"--n must be a whole number"),
        (["--n0", "0"], r"--n0 must be a whole number"),
        (["--alpha", "1.5"], r"--alpha must lie strictly between 0 and 1"),
        (["--batch-size", "0"], r"--batch-size must be a whole number"),
        (["--seed", "-1"], r"--seed must be a non-negative"),
        (["--p-skip", "0.2"], r"--p-skip must lie in"),
        (["--limit", "0"], r"--limit must be a whole number"),
        (["--split", "validation"], r"--split must be one of"),
        (["--device", "nonsense"], r"unknown device 'nonsense'"),
        (["--rule", "best"], r"unknown composition rule 'best'"),
        (["--rule", "cascade"], r"the cascade rule needs a fitted cascade: `router train --kind"),
    ],
)
def test_certify_refuses_bad_flags(capsys, base, flags, match):
    refused(capsys, ["certify", "-w", base, *flags], base, match)


def test_certify_outside_a_workspace(capsys, tmp_path):
    refused(capsys, ["certify", "-w", tmp_path], tmp_path, r"no router\.toml in .*router init")


def test_certify_with_a_truncated_router(capsys, ws):
    weights = ws / ".rsrouter" / "router" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused(capsys, ["certify", "-w", ws], ws, r"model\.safetensors is truncated or corrupt.*train")


def test_certify_with_a_changed_expert(capsys, ws):
    weights = ws / "experts" / "e0.5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    refused(capsys, ["certify", "-w", ws], ws, r"'e0\.5': model\.safetensors does not match")


def test_certify_with_a_broken_record(capsys, ws):
    run_file = next((ws / ".rsrouter" / "certify").glob("*.jsonl"))
    lines = run_file.read_text().splitlines(keepends=True)
    run_file.write_text("{not json\n" + "".join(lines))
    refused(capsys, ["certify", "-w", ws], ws, r"line 1 is not a JSON record.*remove the file")


def test_certify_on_a_read_only_workspace_that_must_compute(capsys, monkeypatch, base):
    unwritable(monkeypatch, base, errno.EROFS)
    match = r"cannot write \S+/certify/\w+\.json: the file system is read-only.*-w"
    refused(capsys, ["certify", "-w", base, "--n", "17"], base, match)


def test_certify_on_a_full_disk(capsys, monkeypatch, base):
    unwritable(monkeypatch, base, errno.ENOSPC)
    match = r"no space left on the device while writing \S+/certify/\w+\.json; free some space"
    refused(capsys, ["certify", "-w", base, "--n", "17"], base, match)


def test_report_on_a_read_only_workspace(capsys, monkeypatch, base):
    unwritable(monkeypatch, base, errno.EROFS)
    refused(capsys, ["report", "-w", base], base, r"cannot write .*report.*read-only")


def test_report_of_a_missing_run(capsys, base, tmp_path):
    refused(capsys, ["report", "-w", base, "--run", tmp_path / "x.jsonl"], base, r"does not exist")


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--n", "0"], r"--n must be a whole number"),
        (["--subset", "1.5"], r"--subset must be a fraction"),
        (["--shard-size", "0"], r"--shard-size must be a whole number"),
        (["--alpha", "0"], r"--alpha must lie strictly between"),
        (["--split", "dev"], r"--split must be one of"),
    ],
)
def test_tables_refuse_bad_flags(capsys, base, flags, match):
    refused(capsys, ["tables", "-w", base, *flags], base, match)


def test_tables_refuse_an_expert_with_another_class_count(capsys, ws, tmp_path):
    two = image_folder(tmp_path / "two", ["cat", "dog"])
    toml = ws / "router.toml"
    toml.write_text(re.sub(r'dataset = ".*"', f'dataset = "{two}"', toml.read_text()))
    refused(capsys, ["tables", "-w", ws], ws, r"'e0\.25' has 3 classes but dataset .* has 2")


def test_tables_refuse_an_expert_with_reversed_class_names(capsys, ws):
    from rsrouter.registry import Workspace

    folder = expert_folder(ws / "experts" / "rev", 1.0, class_names=CLASSES[::-1])
    Workspace.open(ws).add_expert(folder, 1.0, name="reversed")  # the count matches: accepted
    refused(capsys, ["tables", "-w", ws], ws, r"'reversed' names another order of classes")


def test_tables_on_a_read_only_workspace_that_must_compute(capsys, monkeypatch, ws):
    shutil.rmtree(ws / ".rsrouter" / "tables")
    unwritable(monkeypatch, ws, errno.EROFS)
    refused(capsys, ["tables", "-w", ws], ws, r"cannot write .*tables.*read-only")


def test_tables_on_a_disk_that_fills_mid_file(capsys, monkeypatch, ws):
    """The disk fills while a shard is half written: nothing half-written is left behind."""
    write_bytes = Path.write_bytes

    def half_then_full(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    shutil.rmtree(ws / ".rsrouter" / "tables")
    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    refused(capsys, ["tables", "-w", ws], ws, r"no space left .*shard-00000\.safetensors; free")
    assert not list((ws / ".rsrouter").rglob("*.tmp"))


def test_tables_of_a_dataset_without_its_files(capsys, monkeypatch, ws):
    monkeypatch.delenv("RSROUTER_DATA", raising=False)
    toml = ws / "router.toml"
    toml.write_text(re.sub(r'dataset = ".*"', 'dataset = "mnist"', toml.read_text()))
    refused(capsys, ["tables", "-w", ws], ws, r"'mnist' needs its files: set root = .*\[data\]")


@pytest.mark.parametrize(
    "command, section, key, value",
    [("certify", "certify", "n", 0), ("certify", "certify", "seed", -1),
     ("train", "train", "epochs", 0)],
)  # fmt: skip
def test_a_bad_value_in_router_toml_names_the_file_and_table(capsys, ws, command, section, key,
                                                             value):  # fmt: skip
    from rsrouter.registry import Workspace

    Workspace.open(ws).update_settings(section, **{key: value})
    refused(capsys, [command, "-w", ws, "--device", "cpu"], ws,
            rf"router\.toml: \[{section}\] {key} must be .*got {value}\.")  # fmt: skip


def test_tables_with_unreadable_router_toml(capsys, ws):
    (ws / "router.toml").write_text("[data\n")
    refused(capsys, ["tables", "-w", ws], ws, r"router\.toml is not valid TOML")


# ---------------------------------------------------------------- train


@pytest.mark.parametrize(
    "flags, match, code",
    [
        (["--epochs", "0"], r"--epochs must be a whole number", 1),
        (["--batch-size", "0"], r"--batch-size must be a whole number", 1),
        (["--init", "nobody"], r"router init 'nobody' is not a registered expert", 1),
        (
            ["--init", "e0.5"],
            r"is a small_cnn .* classifier but the router's architecture is .*arch_args",
            1,
        ),
        (["--class-map", "Shirt"], r"--class-map.*CLASS=EXPERT", 2),
        (["--frobnicate"], r"No such option.*--frobnicate", 2),
    ],
)
def test_train_refuses_bad_flags(capsys, base, flags, match, code):
    refused(capsys, ["train", "-w", base, *flags], base, match, code=code)


def test_train_with_a_truncated_optimizer_state(capsys, ws):
    state = ws / ".rsrouter" / "router" / "checkpoints" / "epoch-0001.optim.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(capsys, ["train", "-w", ws], ws, r"epoch-0001\.optim\.pt is truncated or corrupt; del")


# ---------------------------------------------------------------- predict


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def test_predict_refuses_a_folder(capsys, base, images):
    refused(capsys, ["predict", images, "-w", base], base, r"is a folder: give image files")


def test_predict_refuses_a_missing_file(capsys, base, images):
    refused(capsys, ["predict", images / "no.png", "-w", base], base, r"no\.png does not exist")


def test_predict_refuses_a_nan_pixel(capsys, base, images):
    values = np.full((8, 8), 0.5)
    values[3, 4] = np.nan
    path = tiff(images / "nan.tif", values)
    refused(capsys, ["predict", path, "-w", base], base, r"nan\.tif has NaN or infinite pixels")


def test_predict_refuses_pixels_out_of_range(capsys, base, images):
    path = tiff(images / "big.tif", np.full((8, 8), 2.0))
    refused(capsys, ["predict", path, "-w", base], base, r"big\.tif has pixels outside \[0, 1\]")


def test_predict_refuses_another_size(capsys, base, images):
    Image.new("RGB", (5, 5)).save(images / "small.png")
    refused(capsys, ["predict", images / "small.png", "-w", base], base, r"is 5x5 pixels")


def test_predict_refuses_a_file_that_is_no_image(capsys, base, images):
    (images / "fake.png").write_text("not an image")
    refused(capsys, ["predict", images / "fake.png", "-w", base], base, r"not a readable image")


def test_predict_refuses_bad_n(capsys, base, images):
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    refused(capsys, ["predict", images / "ok.png", "-w", base, "--n", "0"], base, r"--n must be")


# ---------------------------------------------------------------- experts and the registry


def test_add_expert_of_a_missing_folder(capsys, base):
    refused(capsys, ["add-expert", "./nope", "--sigma", "0.5", "-w", base], base, r"neither a fold")


def test_add_expert_with_bad_sigma(capsys, base):
    args = ["add-expert", base / "experts" / "e0.5", "--sigma", "abc", "-w", base]
    refused(capsys, args, base, r"--sigma must be comma-separated numbers")


def test_add_expert_with_another_class_count(capsys, base, tmp_path):
    folder = expert_folder(tmp_path / "ten", 1.0, num_classes=10, class_names=[])
    args = ["add-expert", folder, "--sigma", "1.0", "-w", base]
    refused(capsys, args, base, r"has 10 classes but 'e0\.25' has 3")


def test_add_expert_twice(capsys, base):
    args = ["add-expert", base / "experts" / "e0.5", "--sigma", "0.5", "--name", "e0.5"]
    refused(capsys, [*args, "-w", base], base, r"'e0\.5' is already registered")


def test_remove_an_unknown_expert(capsys, base):
    refused(capsys, ["remove-expert", "nobody", "-w", base], base, r"no expert named 'nobody'")


def test_verify_a_tampered_expert(capsys, ws):
    (ws / "experts" / "e0.25" / "config.json").write_text("{}")
    refused(capsys, ["experts", "--verify", "-w", ws], ws, r"config\.json does not match")


@pytest.mark.parametrize("sigma", ["-0.5", "nan", "inf"])
def test_export_expert_refuses_a_sigma_that_is_not_positive(capsys, tmp_path, sigma):
    from safetensors.torch import save_file

    from rsrouter.experts import build_classifier

    weights = tmp_path / "w.safetensors"
    save_file(build_classifier("small_cnn", 3, 3).state_dict(), str(weights))
    args = ["export-expert", weights, tmp_path / "out", "--arch", "small_cnn", "--sigma", sigma]
    args += ["--num-classes", "3", "--in-chans", "3", "--input-size", "8"]
    args += ["--mean", "0,0,0", "--std", "1,1,1"]
    refused(capsys, args, tmp_path, r"--sigma must be a positive finite number")


def test_init_over_a_workspace(capsys, base):
    refused(capsys, ["init", base], base, r"router\.toml already exists")


def test_init_with_an_unknown_dataset(capsys, tmp_path):
    refused(capsys, ["init", tmp_path / "w", "--dataset", "imagenet-x"], tmp_path, r"unknown data")


def test_push_to_an_invalid_repo_id_writes_nothing(capsys, base):
    refused(
        capsys, ["push", "not a repo!", "-w", base], base, r"'not a repo!' is not a Hub repo id"
    )


# ---------------------------------------------------------------- a read-only workspace


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["train", "--epochs", "2"],
            r"cannot write \S+/router/checkpoints/epoch-0001\S*: the file",
        ),
        (
            ["add-expert", "{ws}/experts/e0.5", "--sigma", "0.5", "--name", "x"],
            r"router\.toml: the",
        ),
        (["remove-expert", "e0.5"], r"cannot write \S+/router\.toml: the file system is read-only"),
        (["init", "{ws}/sub"], r"cannot create the workspace folder \S+/sub \(Read-only"),
    ],
)
def test_a_read_only_workspace_refuses_writes_in_one_sentence(
    capsys, monkeypatch, base, argv, match
):
    unwritable(monkeypatch, base, errno.EROFS)
    argv = [a.format(ws=base) for a in argv]
    refused(capsys, [*argv, *(["-w", base] if argv[0] != "init" else [])], base, match)


def test_reading_commands_run_on_a_read_only_workspace(capsys, monkeypatch, base, images):
    unwritable(monkeypatch, base, errno.EROFS)
    Image.new("RGB", (8, 8), (120, 120, 120)).save(images / "grey.png")
    assert run(["experts", "--verify", "-w", str(base)]) == 0
    assert run(["predict", str(images / "grey.png"), "--n", "8", "-w", str(base)]) == 0
    assert "grey.png" in capsys.readouterr().out


# ---------------------------------------------------------------- what must NOT be refused


def test_a_cached_certify_reads_a_read_only_workspace(capsys, monkeypatch, base):
    unwritable(monkeypatch, base, errno.EROFS)
    assert run(["certify", "-w", str(base)]) == 0
    out = capsys.readouterr().out
    assert "every one of the 3 inputs is certified already" in out


def test_a_cached_tables_reads_a_read_only_workspace(capsys, monkeypatch, base):
    unwritable(monkeypatch, base, errno.EROFS)
    assert run(["tables", "-w", str(base)]) == 0
    assert "every column is cached (e0.25, e0.5)" in capsys.readouterr().out


def test_a_truncated_column_is_recomputed_and_said(capsys, ws):
    from rsrouter.router.tables import read_column

    column = next((ws / ".rsrouter" / "tables").glob("*.safetensors"))
    whole = read_column(column)
    column.write_bytes(column.read_bytes()[:-40])
    assert run(["tables", "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    assert f"({column}) is truncated or corrupt: redoing it" in out
    assert "computing 1 column(s)" in out
    again = read_column(column)  # seeded by input index: the same column again
    assert torch.equal(again.counts, whole.counts) and torch.equal(again.radius, whole.radius)


def test_a_truncated_checkpoint_is_not_resumed(ws):
    """A corrupt epoch checkpoint counts as absent: training starts over instead of failing."""
    from safetensors import safe_open

    from rsrouter.router.train import _checkpoint_paths, _latest_checkpoint

    folder = ws / ".rsrouter" / "router"
    weights, _ = _checkpoint_paths(folder, 1)
    with safe_open(str(weights), framework="pt") as fh:
        key = fh.metadata()["run"]
    assert _latest_checkpoint(folder, key, 1)[0] == 1
    weights.write_bytes(weights.read_bytes()[:50])
    assert _latest_checkpoint(folder, key, 1) is None
    assert run(["train", "-w", str(ws), "--device", "cpu"]) == 0


def test_certify_and_tables_show_their_plan_first(capsys, ws):
    shutil.rmtree(ws / ".rsrouter" / "tables")
    assert run(["tables", "-w", str(ws), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    plan = re.search(r"plan: 18 inputs of split 'train' .*n=32.*computing 2 column\(s\)", out)
    assert plan and plan.start() < out.index("radius table")
    assert re.search(r"1,152 noisy forward passes: about \d+ (s|min|h) on cpu", out)
    assert run(["certify", "-w", str(ws), "--n", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"plan: 3 of 3 inputs of split 'test' to certify, n0=4, n=20", out)
    assert "e0.25 3, e0.5 3, router 3" in out
    assert re.search(r"216 noisy forward passes: about \d+ (s|min|h) on cpu", out)
    assert out.index("plan:") < out.index("certified accuracy")


def test_the_matrix_has_at_least_thirty_cases():
    import sys

    module = sys.modules[__name__]
    count = 0
    for name, fn in vars(module).items():
        if name.startswith("test_") and "refused" in fn.__code__.co_names:
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            count += len(marks[0].args[1]) if marks else 1
    assert count >= 30, count
