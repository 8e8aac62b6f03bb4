"""Weight datasets: building, metadata, save/load, resumable fit folders, refusal of mismatched folders."""

import numpy as np
import pytest
import torch

from nef_transformers.data import weights as weights_module
from nef_transformers.data.images import ImageSource, load_mnist
from nef_transformers.data.metadata import get_shared_init, get_source_info, get_spec, make_weight_dataset, weights_tensor
from nef_transformers.data.weights import (
    IncompleteFitError, build_nef_dataset, fit_to_disk, load_nef_dataset, select_indices,
)
from nef_transformers.fields import FitConfig, SirenSpec, render_images, siren_init

SPEC = SirenSpec(hidden_dim=8)
CONFIG = FitConfig(steps=5, batch_size=4)


@pytest.fixture(scope="module")
def digits():
    source = load_mnist()
    keep = np.r_[0:6, 500:506]  # six 0s and six 1s
    return ImageSource(source.images[keep], source.labels[keep], name="mnist-12", mean=source.mean, std=source.std)


def test_built_dataset_columns_metadata_and_quality(digits):
    dataset = build_nef_dataset(digits, SPEC, CONFIG, num_fields=5, progress=False)
    assert dataset.column_names == ["weights", "label", "psnr", "index"]
    assert dataset.features["weights"].length == SPEC.num_params
    assert dataset.features["weights"].feature.dtype == "float32"
    assert get_spec(dataset) == SPEC
    expected_init = siren_init(SPEC, 1, generator=torch.Generator().manual_seed(CONFIG.seed))[0]
    assert torch.equal(get_shared_init(dataset), expected_init)
    assert get_source_info(dataset)["mean"] == [0.1307]
    rows = np.asarray(dataset["index"])
    assert len(set(rows)) == 5 and np.array_equal(np.asarray(dataset["label"]), digits.labels[rows])
    # the stored psnr is the psnr of the stored weights rendered against the source images
    images = render_images(SPEC, weights_tensor(dataset), (28, 28, 1), digits.mean, digits.std)
    truth = digits.images[rows, ..., 0] / 255.0
    for i in range(5):
        peak = truth[i].max()
        psnr = -10 * np.log10(np.mean((images[i, ..., 0] / peak - truth[i] / peak) ** 2))
        assert psnr >= dataset["psnr"][i] - 0.01


def test_save_load_round_trip_keeps_weights_and_metadata(digits, tmp_path):
    dataset = build_nef_dataset(digits, SPEC, CONFIG, num_fields=3, progress=False)
    dataset.save_to_disk(str(tmp_path / "saved"))
    loaded = load_nef_dataset(tmp_path / "saved")
    assert torch.equal(weights_tensor(loaded), weights_tensor(dataset))
    assert get_spec(loaded) == SPEC and torch.equal(get_shared_init(loaded), get_shared_init(dataset))
    # metadata survives the usual dataset operations
    split = loaded.train_test_split(test_size=1, seed=0)["train"]
    assert get_spec(split.shuffle(seed=1)) == SPEC


def test_weights_tensor_follows_selection():
    weights = torch.randn(6, SPEC.num_params)
    dataset = make_weight_dataset(weights, [0] * 6, SPEC, None, {"kind": "image"})
    assert torch.equal(weights_tensor(dataset.select([4, 1])), weights[[4, 1]])
    assert get_shared_init(dataset) is None


def test_non_finite_weights_are_refused():
    weights = torch.zeros(3, SPEC.num_params)
    weights[2, 5] = float("inf")
    with pytest.raises(ValueError, match="fields \\[2\\]"):
        make_weight_dataset(weights, [0] * 3, SPEC, None, {"kind": "image"})


def test_plain_dataset_without_metadata_is_refused(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"weights": [[0.0]]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no nef_transformers metadata"):
        load_nef_dataset(tmp_path / "plain")


def test_select_indices_is_a_seeded_subset_and_validates():
    assert select_indices(10, None, 0) == list(range(10))
    subset = select_indices(100, 10, seed=3)
    assert subset == select_indices(100, 10, seed=3) and len(set(subset)) == 10
    assert subset != select_indices(100, 10, seed=4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            select_indices(10, bad, 0)
    with pytest.raises(ValueError, match="more than the source has"):
        select_indices(10, 11, 0)
    with pytest.raises(ValueError, match="empty"):
        select_indices(0, None, 0)


def test_interrupted_fit_resumes_without_refitting(digits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_build = weights_module.build_nef_dataset

    def flaky_build(*args, **kwargs):
        calls.append(tuple(kwargs["indices"]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second shard
        return real_build(*args, **kwargs)

    monkeypatch.setattr(weights_module, "build_nef_dataset", flaky_build)
    with pytest.raises(KeyboardInterrupt):
        fit_to_disk(digits, out, SPEC, CONFIG, num_fields=10, shard_size=4, progress=False)
    with pytest.raises(IncompleteFitError, match="4 of 10 fields fitted"):
        load_nef_dataset(out)
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-000000-000004"]

    calls.clear()
    monkeypatch.setattr(weights_module, "build_nef_dataset",
                        lambda *a, **k: calls.append(k["indices"]) or real_build(*a, **k))
    resumed = fit_to_disk(digits, out, SPEC, CONFIG, num_fields=10, shard_size=4, progress=False)
    assert len(calls) == 2  # shards 2 and 3 only
    fresh = fit_to_disk(digits, tmp_path / "fresh", SPEC, CONFIG, num_fields=10, shard_size=4, progress=False)
    assert torch.equal(weights_tensor(resumed), weights_tensor(fresh))
    assert resumed["index"] == fresh["index"]


def test_folder_of_another_spec_or_run_is_refused(digits, tmp_path):
    out = tmp_path / "run"
    fit_to_disk(digits, out, SPEC, CONFIG, num_fields=4, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="another SirenSpec"):
        fit_to_disk(digits, out, SirenSpec(hidden_dim=9), CONFIG, num_fields=4, progress=False)
    with pytest.raises(ValueError, match="num_fields"):
        fit_to_disk(digits, out, SPEC, CONFIG, num_fields=5, shard_size=4, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a nef_transformers fit folder"):
        fit_to_disk(digits, tmp_path / "foreign", SPEC, CONFIG, num_fields=4, progress=False)


def test_unwritable_output_fails_before_fitting(digits, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="cannot write to the output folder"):
        fit_to_disk(digits, blocker / "run", SPEC, CONFIG, num_fields=4, progress=False)
