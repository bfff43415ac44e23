"""rsrouter.data: the bundled subset, raw IDX files (both layouts), ImageFolder, fingerprints."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rsrouter.data import (
    FASHION_MNIST_CLASSES,
    SUBSET,
    SUBSET_FILE,
    build_subset,
    load_dataset,
    read_idx,
)
from rsrouter.errors import UsageError

SHARED = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(
    not (SHARED / "fashion-mnist").is_dir(), reason="raw Fashion-MNIST files not on this machine"
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_bundled_subset_is_real_balanced_and_in_unit_range():
    train, test = load_dataset(SUBSET, "train"), load_dataset(SUBSET, "test")
    assert train.images.shape == (2000, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert float(train.images.min()) >= 0 and float(train.images.max()) <= 1
    assert train.labels.bincount().tolist() == [200] * 10
    assert test.labels.bincount().tolist() == [50] * 10
    assert train.class_names == FASHION_MNIST_CLASSES and train.input_shape == (1, 28, 28)
    assert train.fingerprint != test.fingerprint
    assert load_dataset(SUBSET, "test").fingerprint == test.fingerprint
    # real images, not noise: many exact-zero background pixels and a wide range of values
    assert float((test.images == 0).float().mean()) > 0.3
    assert len(torch.unique(test.images)) > 200


@needs_shared
def test_subset_matches_the_raw_files_it_was_drawn_from(tmp_path):
    full = load_dataset("fashion-mnist", "test", root=SHARED)
    assert full.images.shape == (10000, 1, 28, 28)
    with np.load(SUBSET_FILE) as npz:
        idx = npz["test_source_index"]
    subset = load_dataset(SUBSET, "test")
    assert torch.equal(full.images[idx], subset.images)
    assert torch.equal(full.labels[idx], subset.labels)
    # the build is deterministic
    rebuilt = build_subset(SHARED, tmp_path / "again.npz")
    with np.load(rebuilt) as a, np.load(SUBSET_FILE) as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)


def test_idx_in_our_layout_and_torchvision_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = np.arange(7) % 10
    ours = tmp_path / "ours" / "mnist"
    ours.mkdir(parents=True)
    write_idx(ours / "t10k-images-idx3-ubyte.gz", images)
    write_idx(ours / "t10k-labels-idx1-ubyte.gz", labels)
    a = load_dataset("mnist", "test", root=tmp_path / "ours")
    assert a.images.shape == (7, 1, 5, 4)
    assert torch.equal(a.images[:, 0], torch.from_numpy(images).float() / 255)
    assert a.labels.tolist() == labels.tolist()
    # torchvision's unpacked raw/ layout, found through the environment variable
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(ours / f"{name}.gz") as src, (raw / name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    monkeypatch.setenv("RSROUTER_DATA", str(tmp_path / "tv"))
    b = load_dataset("mnist", "test")
    assert b.fingerprint == a.fingerprint
    with pytest.raises(UsageError, match="not found"):
        load_dataset("mnist", "train")


def test_fingerprint_follows_the_content(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    write_idx(d / "t10k-images-idx3-ubyte.gz", images)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    before = load_dataset("mnist", "test", root=tmp_path).fingerprint
    images[1, 1, 1] = 1
    write_idx(d / "t10k-images-idx3-ubyte.gz", images)
    after = load_dataset("mnist", "test", root=tmp_path)
    assert after.fingerprint != before
    sub = after.subset([2, 0])
    assert sub.labels.tolist() == [2, 0] and sub.fingerprint not in (before, after.fingerprint)
    assert after.subset([2, 0]).fingerprint == sub.fingerprint
    assert after.subset([0, 2]).fingerprint != sub.fingerprint


def test_image_folder_with_split_subfolders(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((6, 5, 3), 40 * i + (cls == "dog") * 100, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(tmp_path, "test")
    assert ds.images.shape == (4, 3, 6, 5) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert float(ds.images[3].max()) == pytest.approx(140 / 255)
    assert len(load_dataset(tmp_path, "train")) == 6


def test_bad_requests_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("RSROUTER_DATA", raising=False)
    with pytest.raises(UsageError, match="split"):
        load_dataset(SUBSET, "validation")
    with pytest.raises(UsageError, match="RSROUTER_DATA"):
        load_dataset("fashion-mnist", "test")
    with pytest.raises(UsageError, match="unknown dataset"):
        load_dataset("imagenet-21k", "test")
    with pytest.raises(UsageError, match="CIFAR-10 not found"):
        load_dataset("cifar10", "test", root=tmp_path)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"not an idx file")
    with pytest.raises(UsageError, match="not an IDX"):
        read_idx(bad)
    bad.write_bytes(b"not gzipped")
    with pytest.raises(UsageError, match="could not be read"):
        read_idx(bad)
    broken = tmp_path / "folder" / "cat"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="x.png is not a readable image"):
        load_dataset(tmp_path / "folder", "test")
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(UsageError, match="truncated"):
        read_idx(short)


def write_cifar(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Both on-disk forms of CIFAR-10 (tiny): python batches and the binary version."""
    import pickle

    py, binary = root / "py" / "cifar-10-batches-py", root / "bin" / "cifar-10-batches-bin"
    py.mkdir(parents=True)
    binary.mkdir(parents=True)
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(i, i + 1) if name != "test_batch" else slice(0, len(images))
        batch = {"data": chw[part], "labels": labels[part].tolist(), "filenames": [b"x.png"]}
        (py / name).write_bytes(pickle.dumps(batch, protocol=2))
        records = np.concatenate([labels[part, None].astype(np.uint8), chw[part]], axis=1)
        (binary / f"{name}.bin").write_bytes(records.tobytes())


def test_cifar10_both_forms_without_running_pickled_code(tmp_path):
    import os
    import pickle

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2])
    write_cifar(tmp_path, images, labels)
    py = load_dataset("cifar10", "train", root=tmp_path / "py")
    assert py.images.shape == (5, 3, 32, 32) and py.labels.tolist() == [0, 9, 3, 3, 1]
    assert torch.equal(py.images[1], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255)
    assert py.class_names[9] == "truck"
    binary = load_dataset("cifar10", "test", root=tmp_path / "bin")
    assert binary.fingerprint == load_dataset("cifar10", "test", root=tmp_path / "py").fingerprint

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    evil = tmp_path / "py" / "cifar-10-batches-py" / "test_batch"
    evil.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(UsageError, match="refused global .*getcwd"):
        load_dataset("cifar10", "test", root=tmp_path / "py")
