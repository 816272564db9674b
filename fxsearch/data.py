"""Datasets of the search driver, named by a short spec string.

  digits          scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes,
                  nothing downloaded), upscaled bilinearly to 16x16 and repeated over
                  ``channels`` (3 by default, so ResNet-8 and torchvision models take it as
                  is), values in [0, 1]; training images shifted at random by up to size/8
                  pixels. Split 60/20/20 into train/val/test, stratified by class, with a
                  fixed seed: every run sees the same test images.
  cifar10:PATH    torchvision.datasets.CIFAR10(root=PATH, download=False): PATH holds
                  cifar-10-batches-py/. Files are checked for presence, not checksums (so a
                  re-packed or subset copy works). The last 5,000 training images (a fixed
                  permutation) are the validation split; the test batch is the test split.
                  Training images get random crop (padding 4) and horizontal flip.
  imagefolder:PATH  torchvision ImageFolder. With PATH/train and PATH/val (or PATH/test),
                  those are used (10% of train held out for validation); otherwise the one
                  folder is split 80/10/10. Images resized and center-cropped to
                  ``image_size`` (default 32), random horizontal flip for training.

Every split yields ``(image, label)`` with float32 images of shape ``input_shape``.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .errors import ConfigError

SPLIT_SEED = 0   # fixed: the splits never depend on the training seed
DATASETS = ("digits", "cifar10:PATH", "imagefolder:PATH")


@dataclasses.dataclass
class DataSplits:
    """Train / validation / test datasets of one spec."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]   # one sample, e.g. (3, 16, 16)

    def limited(self, train: int | None = None, eval: int | None = None) -> "DataSplits":
        """The first ``train`` training and ``eval`` validation/test samples (quick runs, tests)."""
        cut = lambda ds, n: ds if n is None or n >= len(ds) else Subset(ds, range(n))  # noqa: E731
        return dataclasses.replace(self, train=cut(self.train, train), val=cut(self.val, eval),
                                   test=cut(self.test, eval))


class TensorImages(Dataset):
    """Images held as one uint8 or float tensor (N, C, H, W), divided by ``scale`` and
    normalised; augmentation: a random shift of up to ``pad`` pixels, a random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float | list[float] = 0.0,
                 std: float | list[float] = 1.0, scale: float = 1.0, pad: int = 0, flip: bool = False):
        self.images, self.labels, self.pad, self.flip = images, labels.long(), pad, flip
        c = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).expand(c).reshape(c, 1, 1).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).expand(c).reshape(c, 1, 1).clone()
        self.scale = scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float() / self.scale
        if self.pad:
            h, w, p = *x.shape[-2:], self.pad
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, top:top + h, left:left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


def _split_indices(labels: torch.Tensor, fractions: tuple[float, float]) -> tuple[torch.Tensor, ...]:
    """Stratified (val, test) fractions; the rest is train. Deterministic (SPLIT_SEED)."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val, n_test = (round(f * len(idx)) for f in fractions)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return tuple(torch.cat(p)[torch.randperm(sum(len(q) for q in p), generator=gen)] for p in parts)


def digits(channels: int = 3, size: int = 16) -> DataSplits:
    """scikit-learn's 8x8 digits as ``channels`` x size x size images (see the module doc)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ConfigError(f"the digits dataset needs scikit-learn ({err}); pip install scikit-learn") from err
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(bunch.target)
    train, val, test = _split_indices(y, (0.2, 0.2))
    pad = size // 8
    return DataSplits("digits", TensorImages(x[train], y[train], pad=pad), TensorImages(x[val], y[val]),
                      TensorImages(x[test], y[test]), 10, (channels, size, size))


def _cifar10_class():
    from torchvision.datasets import CIFAR10

    class PresentCIFAR10(CIFAR10):
        """CIFAR10 that checks its files for presence instead of their published checksums."""

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return PresentCIFAR10


CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def cifar10(path: str, channels: int = 3) -> DataSplits:
    """CIFAR-10 from PATH/cifar-10-batches-py (python format), never downloaded."""
    cls = _cifar10_class()
    folder = os.path.join(path, cls.base_folder)
    needed = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        where = folder if os.path.isdir(folder) else path
        raise ConfigError(f"cifar10:{path}: {missing[0]} not found in {where!r} ({len(missing)} of "
                          f"{len(needed)} files missing); PATH must hold cifar-10-batches-py/ from "
                          "cifar-10-python.tar.gz (nothing is downloaded)")
    if channels != 3:
        raise ConfigError(f"cifar10 images have 3 channels; the model takes {channels}")
    try:
        sets = [cls(root=path, train=t, download=False) for t in (True, False)]
    except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise ConfigError(f"cifar10:{path}: cannot read the batches ({type(err).__name__}: {err})") from err
    (tx, ty), (sx, sy) = ((torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
                          for s in sets)
    perm = torch.randperm(len(ty), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = min(5000, len(ty) // 10) if len(ty) >= 10 else 0
    val_idx, train_idx = perm[len(perm) - n_val:], perm[:len(perm) - n_val]
    common = dict(mean=CIFAR_MEAN, std=CIFAR_STD, scale=255.0)
    return DataSplits(
        f"cifar10:{path}",
        TensorImages(tx[train_idx], ty[train_idx], pad=4, flip=True, **common),
        TensorImages(tx[val_idx], ty[val_idx], **common),
        TensorImages(sx, sy, **common), len(sets[0].classes), (3, 32, 32))


class _Transformed(Dataset):
    """A subset of an ImageFolder with its own transform (train and eval differ)."""

    def __init__(self, folder: Any, indices: Any, transform: Callable):
        self.folder, self.indices, self.transform = folder, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[self.indices[i]]
        return self.transform(self.folder.loader(path)), label


def imagefolder(path: str, channels: int = 3, image_size: int = 32) -> DataSplits:
    """torchvision ImageFolder at PATH (see the module doc for the splits)."""
    from torchvision import datasets, transforms as T
    if not os.path.isdir(path):
        raise ConfigError(f"imagefolder:{path}: no such directory; PATH must hold one folder per class "
                          "(or train/ and val/ folders that do)")
    base = [T.Resize(image_size), T.CenterCrop(image_size)] + ([T.Grayscale(channels)] if channels != 3 else [])
    tail = [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]
    train_tf, eval_tf = T.Compose(base + [T.RandomHorizontalFlip()] + tail), T.Compose(base + tail)
    held_out = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    root = os.path.join(path, "train") if held_out and os.path.isdir(os.path.join(path, "train")) else path
    try:
        folder = datasets.ImageFolder(root)
        test_folder = datasets.ImageFolder(held_out) if root != path else None
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"imagefolder:{path}: {err}") from err
    labels = torch.tensor(folder.targets)
    train, val, test = _split_indices(labels, (0.1, 0.0 if test_folder else 0.1))
    if test_folder is not None:
        if test_folder.classes != folder.classes:
            raise ConfigError(f"imagefolder:{path}: the classes of {held_out!r} differ from those of {root!r}")
        test_set = _Transformed(test_folder, range(len(test_folder)), eval_tf)
    else:
        test_set = _Transformed(folder, test.tolist(), eval_tf)
    return DataSplits(f"imagefolder:{path}", _Transformed(folder, train.tolist(), train_tf),
                      _Transformed(folder, val.tolist(), eval_tf), test_set, len(folder.classes),
                      (channels, image_size, image_size))


def load_data(spec: str, *, channels: int | None = None, image_size: int | None = None) -> DataSplits:
    """The dataset a spec names (``digits``, ``cifar10:PATH``, ``imagefolder:PATH``).

    channels: what the model's first layer takes (digits repeats its gray channel,
    imagefolder converts to gray for 1); image_size: digits and imagefolder only."""
    name, sep, path = spec.partition(":")
    kw: dict[str, Any] = {} if channels is None else {"channels": channels}
    if name == "digits" and not sep:
        return digits(**kw, **({} if image_size is None else {"size": image_size}))
    if name in ("cifar10", "imagefolder") and sep and path:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise ConfigError(f"{name}:{path}: no such file or directory")
        if name == "cifar10":
            return cifar10(path, **kw)
        return imagefolder(path, **kw, **({} if image_size is None else {"image_size": image_size}))
    if name in ("cifar10", "imagefolder"):
        raise ConfigError(f"dataset {spec!r} needs a path: {name}:PATH")
    raise ConfigError(f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)}")
