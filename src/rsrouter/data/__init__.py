"""Image datasets as [0, 1] float tensors with class names and a content fingerprint.

Sources: the Fashion-MNIST subset shipped in this package, raw IDX .gz files of Fashion-MNIST and
MNIST (our layout or torchvision's), CIFAR-10 from a torchvision root (its python batches, read
with an arrays-only unpickler) or the binary version, and an ImageFolder directory. Nothing here
touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rsrouter.errors import UsageError
from rsrouter.io import atomic_path

SUBSET = "fashion-mnist-subset"
SUBSET_FILE = Path(__file__).with_name("fashion_mnist_subset.npz")
SPLITS = ("train", "test")
VALIDATION = "val"  # a fixed random part of "train", held out when a workspace asks for one
ENV_ROOT = "RSROUTER_DATA"
COMBINED = "mnist+fashion-mnist"  # one 20-class deployment that sees digits and clothes

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# name -> (class names, folder names to look for under a root: ours, then torchvision's raw/).
IDX_DATASETS = {
    "fashion-mnist": (FASHION_MNIST_CLASSES, ("fashion-mnist", "FashionMNIST/raw")),
    "mnist": (MNIST_CLASSES, ("mnist", "MNIST/raw")),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64, and where they came from."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices) -> Dataset:
        """The inputs at ``indices``; its fingerprint names the parent and the indices."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        digest = hashlib.sha256(self.fingerprint.encode())
        digest.update(idx.numpy().astype("<i8").tobytes())
        return Dataset(
            self.name,
            self.split,
            self.images[idx],
            self.labels[idx],
            self.class_names,
            digest.hexdigest(),
        )


def fingerprint_arrays(images: np.ndarray, labels: np.ndarray, class_names) -> str:
    """sha256 over the uint8 pixels, their shape, the labels and the class names."""
    digest = hashlib.sha256()
    digest.update(repr((images.shape, str(images.dtype), tuple(class_names))).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def from_uint8(name: str, split: str, images, labels, class_names) -> Dataset:
    """A Dataset from uint8 images (N, H, W) or (N, H, W, C) and integer labels."""
    label = f"{name}:{split}"
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UsageError(f"dataset {label!r}: expected uint8 images, got {images.dtype}.")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise UsageError(f"dataset {label!r}: images must be (N, H, W[, C]), got {images.shape}.")
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) != len(images):
        raise UsageError(f"dataset {label!r}: {len(images)} images but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UsageError(f"dataset {label!r}: labels outside 0..{len(class_names) - 1}.")
    images = np.require(images, requirements=("C", "W"))
    fingerprint = fingerprint_arrays(images, labels, class_names)
    return Dataset(
        name=name,
        split=split,
        images=torch.from_numpy(images).float().div_(255),
        labels=torch.from_numpy(labels),
        class_names=tuple(class_names),
        fingerprint=fingerprint,
    )


def load_dataset(name_or_path: str | os.PathLike, split: str = "test", root=None) -> Dataset:
    """Load a dataset by name (see module docstring) or an ImageFolder directory path.

    ``root`` (or the RSROUTER_DATA environment variable) is where the raw files live, for every
    name except the bundled subset.
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}.")
    name = check_dataset_name(name_or_path)
    if name == SUBSET:
        return load_subset(split)
    if name in IDX_DATASETS:
        return load_idx(name, split, data_root(name, root))
    if name == COMBINED:
        return load_combined(split, data_root(name, root))
    if name == "cifar10":
        return load_cifar10(split, data_root(name, root))
    return load_image_folder(Path(name), split)


def check_dataset_name(name_or_path: str | os.PathLike) -> str:
    """A dataset name ``load_dataset`` knows, or an existing directory; else a UsageError."""
    name = str(name_or_path)
    if name in (SUBSET, *IDX_DATASETS, COMBINED, "cifar10") or Path(name).is_dir():
        return name
    raise UsageError(
        f"unknown dataset {name!r}: use {SUBSET}, fashion-mnist, mnist, {COMBINED}, cifar10 or "
        "an ImageFolder directory."
    )


def load_split(
    name_or_path: str | os.PathLike,
    split: str,
    root=None,
    *,
    validation: int = 0,
    validation_seed: int = 0,
) -> Dataset:
    """``train``, ``val`` or ``test``. With ``validation`` = K > 0, ``val`` is a fixed random K
    of the training images (``validation_indices``) and ``train`` is the rest, so that nothing
    tuned on ``val`` has seen it in training and the test split is never used for tuning."""
    if split != VALIDATION and (split != "train" or not validation):
        return load_dataset(name_or_path, split, root=root)
    if not validation:
        raise UsageError(
            "this workspace has no validation split: set [data] validation = K in router.toml "
            "(K training images held out for tuning)."
        )
    train = load_dataset(name_or_path, "train", root=root)
    held_out = validation_indices(len(train), validation, validation_seed)
    if split == VALIDATION:
        return replace(train.subset(held_out), split=VALIDATION)
    return train.subset(np.setdiff1d(np.arange(len(train)), held_out))


def validation_indices(size: int, validation: int, seed: int = 0) -> np.ndarray:
    """The sorted training indices held out as the validation split (deterministic in seed)."""
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
        raise UsageError(f"[data] validation must be a whole number >= 0, got {validation!r}.")
    if validation >= size:
        raise UsageError(
            f"[data] validation = {validation} leaves no training images (the split has {size})."
        )
    perm = np.random.default_rng([int(seed), 0x7A11D]).permutation(size)
    return np.sort(perm[:validation]).astype(np.int64)


def data_root(name: str, root) -> Path:
    root = root or os.environ.get(ENV_ROOT)
    if not root:
        raise UsageError(
            f'dataset {name!r} needs its files: set root = "FOLDER" in the workspace\'s [data] '
            f"table (load_dataset(..., root=FOLDER) in Python) or the {ENV_ROOT} variable."
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"data root {root} is not a directory.")
    return root


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (big-endian header, uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path} could not be read ({exc}).") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UsageError(f"{path} is truncated: its header names {ndim} dimensions.")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated: expected {int(np.prod(dims))} values.")
    return data.reshape(tuple(dims))


def find_idx(root: Path, folders, stem: str) -> Path:
    for folder in (*folders, "."):
        for suffix in (".gz", ""):
            path = root / folder / (stem + suffix)
            if path.is_file():
                return path
    raise UsageError(
        f"{stem}[.gz] not found under {root} (looked in {', '.join(folders)} and the root itself)."
    )


def load_idx(name: str, split: str, root: Path) -> Dataset:
    class_names, folders = IDX_DATASETS[name]
    image_stem, label_stem = IDX_FILES[split]
    images = read_idx(find_idx(root, folders, image_stem))
    labels = read_idx(find_idx(root, folders, label_stem))
    return from_uint8(name, split, images, labels, class_names)


def load_combined(split: str, root: Path) -> Dataset:
    """MNIST digits (classes 0-9) and Fashion-MNIST items (classes 10-19) in one data set,
    shuffled once with a fixed permutation so that the first K inputs of a split mix both."""
    parts = [load_idx(name, split, root) for name in ("mnist", "fashion-mnist")]
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([parts[0].labels, parts[1].labels + len(MNIST_CLASSES)])
    order = torch.from_numpy(np.random.default_rng([0, 0xC0B1]).permutation(len(labels)))
    digest = hashlib.sha256(f"{COMBINED}:{split}".encode())
    for part in parts:
        digest.update(part.fingerprint.encode())
    return Dataset(
        COMBINED,
        split,
        images[order],
        labels[order],
        (*MNIST_CLASSES, *FASHION_MNIST_CLASSES),
        digest.hexdigest(),
    )


def load_subset(split: str) -> Dataset:
    if not SUBSET_FILE.is_file():
        raise UsageError(f"the bundled subset {SUBSET_FILE} is missing from this installation.")
    with np.load(SUBSET_FILE, allow_pickle=False) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    return from_uint8(SUBSET, split, images, labels, FASHION_MNIST_CLASSES)


CIFAR_PY, CIFAR_BIN = "cifar-10-batches-py", "cifar-10-batches-bin"
CIFAR_BATCHES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
# The only globals a CIFAR-10 python batch refers to: numpy arrays and a string codec.
CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: no other code can run."""

    def find_class(self, module, name):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return _ArrayUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"{path} is not a CIFAR-10 batch ({exc}).") from exc


def load_cifar10(split: str, root: Path) -> Dataset:
    """CIFAR-10 from torchvision's unpacked python batches or the binary version, no download.

    The python batches are pickles; they are read with an unpickler that admits numpy arrays
    and nothing else, so a tampered file cannot run code.
    """
    for base in (root, root / "cifar10", root / "CIFAR10"):
        if (base / CIFAR_BIN).is_dir():
            return _cifar_binary(split, base / CIFAR_BIN)
        if (base / CIFAR_PY).is_dir():
            folder = base / CIFAR_PY
            images, labels = [], []
            for name in CIFAR_BATCHES[split]:
                if not (folder / name).is_file():
                    raise UsageError(f"{folder / name} is missing.")
                batch = read_cifar_batch(folder / name)
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch["labels"])
            images = np.concatenate(images).transpose(0, 2, 3, 1)
            return from_uint8("cifar10", split, images, np.asarray(labels), CIFAR10_CLASSES)
    raise UsageError(
        f"CIFAR-10 not found under {root} (expects {CIFAR_PY}/ as torchvision unpacks it, or "
        f"{CIFAR_BIN}/; nothing is downloaded)."
    )


def _cifar_binary(split: str, folder: Path) -> Dataset:
    """The binary version: records of one label byte and 3072 pixel bytes (channel-major)."""
    records = []
    for name in CIFAR_BATCHES[split]:
        path = folder / f"{name}.bin"
        if not path.is_file():
            raise UsageError(f"{path} is missing.")
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if raw.size % 3073:
            raise UsageError(f"{path} is not a CIFAR-10 binary batch (size {raw.size}).")
        records.append(raw.reshape(-1, 3073))
    data = np.concatenate(records)
    images = data[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return from_uint8("cifar10", split, images, data[:, 0], CIFAR10_CLASSES)


def load_image_folder(path: Path, split: str) -> Dataset:
    """``path/<split>/<class>/*`` if that exists, else ``path/<class>/*``; one image size."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = path / split if (path / split).is_dir() else path
    try:
        ds = ImageFolder(str(folder), loader=lambda p: Image.open(p).convert("RGB"))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(
            f"{folder} is not an ImageFolder (one sub-folder of images per class)."
        ) from exc
    if not len(ds):
        raise UsageError(f"{folder} holds no images.")
    arrays = []
    for p, _ in ds.samples:
        try:
            arrays.append(np.asarray(ds.loader(p), dtype=np.uint8))
        except OSError as exc:  # PIL's UnidentifiedImageError included
            raise UsageError(f"{p} is not a readable image ({exc}).") from exc
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UsageError(f"{folder}: images differ in size ({sorted(shapes)[:3]}…); resize them.")
    labels = np.asarray([y for _, y in ds.samples])
    return from_uint8(str(folder.resolve()), split, np.stack(arrays), labels, ds.classes)


def build_subset(root, out=SUBSET_FILE, n_train: int = 2000, n_test: int = 500, seed: int = 0):
    """Write the bundled subset: a class-balanced random draw from raw Fashion-MNIST IDX files."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n_train), ("test", n_test)):
        folders = IDX_DATASETS["fashion-mnist"][1]
        ds_images, ds_labels = (
            read_idx(find_idx(Path(root), folders, s)) for s in IDX_FILES[split]
        )
        per_class = count // 10
        picks = [rng.permutation(np.flatnonzero(ds_labels == c))[:per_class] for c in range(10)]
        idx = np.sort(np.concatenate(picks))
        arrays[f"{split}_images"] = ds_images[idx]
        arrays[f"{split}_labels"] = ds_labels[idx].astype(np.uint8)
        arrays[f"{split}_source_index"] = idx.astype(np.int32)
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(out)
