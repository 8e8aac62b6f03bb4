"""Image sources: the embedded MNIST default, npz files, `datasets` image datasets (the hub path), validation."""

import numpy as np
import pytest
import torch

from nef_transformers.data.images import ImageSource, image_grid, load_image_npz, load_mnist
from nef_transformers.data.sources import load_source


def test_embedded_mnist_is_5000_real_digits_500_per_class():
    source = load_mnist()
    assert len(source) == 5000 and source.image_shape == (28, 28, 1)
    assert np.bincount(source.labels).tolist() == [500] * 10
    assert (source.mean, source.std) == ((0.1307,), (0.3081,))
    signals = source.signals([0, 1])
    expected = (source.images[0].reshape(-1).astype(np.float32) / 255 - 0.1307) / 0.3081
    assert np.allclose(signals[0, :, 0].numpy(), expected, atol=1e-6)


def test_grid_is_xy_on_minus_one_one():
    grid = image_grid(3, 4)
    assert grid.shape == (12, 2)
    assert torch.equal(grid[0], torch.tensor([-1.0, -1.0])) and torch.equal(grid[-1], torch.tensor([1.0, 1.0]))
    assert torch.equal(grid[1, 1], torch.tensor(-1.0))  # moving along a row changes x only


def test_hub_path_on_a_local_image_dataset():
    """`from_hf_dataset` is what `load_cifar10`/`load_microimagenet` use after `datasets.load_dataset`."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    dataset = Dataset.from_dict(
        {"img": [PILImage.fromarray(a) for a in arrays], "label": [0, 1, 2, 0, 1, 2]},
        features=Features({"img": Image(), "label": ClassLabel(names=["a", "b", "c"])}),
    )
    source = ImageSource.from_hf_dataset(dataset, "img", "label", name="local", limit=4)
    assert np.array_equal(source.images, arrays[:4])
    assert source.labels.tolist() == [0, 1, 2, 0] and source.class_names == ["a", "b", "c"]
    assert np.allclose(source.mean, arrays[:4].reshape(-1, 3).mean(0) / 255, atol=1e-6)


def test_shared_image_files_load(shared_data):
    cifar = load_source(shared_data / "images" / "cifar10_2k.npz")
    assert len(cifar) == 2000 and cifar.image_shape == (32, 32, 3) and len(cifar.class_names) == 10
    micro = load_image_npz(shared_data / "images" / "microimagenet_standin_1k.npz", num_images=10)
    assert micro.image_shape == (64, 64, 3) and len(micro) == 10


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((2, 5, 5, 2), np.uint8), [0, 0], "C in \\(1, 3\\)"),
    (np.zeros((2, 5), np.uint8), [0, 0], "must have shape"),
    (np.zeros((2, 5, 5), np.int32), [0, 0], "dtype int32"),
    (np.full((2, 5, 5), np.nan, np.float32), [0, 0], "NaN or inf"),
    (np.full((2, 5, 5), 2.0, np.float32), [0, 0], "must lie in \\[0, 1\\]"),
    (np.zeros((0, 5, 5), np.uint8), [], "empty"),
    (np.zeros((2, 5, 5), np.uint8), [0], "labels must be 2 integers"),
])
def test_bad_images_raise(images, labels, message):
    with pytest.raises(ValueError, match=message):
        ImageSource(images, np.asarray(labels, dtype=np.int64), name="bad")


def test_bad_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither one of"):
        load_source("svhn")
    np.savez(tmp_path / "other.npz", pixels=np.zeros(3))
    with pytest.raises(ValueError, match="neither 'images' nor 'voxels'"):
        load_source(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_source(tmp_path / "broken.npz")
