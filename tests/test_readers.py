"""Readers of released weights: fixtures written in the exact release formats, checked by function equivalence
(an independent implementation of the original network against `siren_forward` on the converted weights)."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from nef_transformers.data.metadata import get_shared_init, get_source_info, get_spec, nef_metadata, weights_tensor
from nef_transformers.data.readers import read_arena, read_hyperdiffusion
from nef_transformers.fields.siren import positional_encoding, siren_forward
from nef_transformers.fields.spec import SirenSpec


# ============================================================================ Neural Field Arena (fit-a-nef)
def flax_siren_params(rng, n, in_dim=2, hidden_dim=8, num_layers=3, out_dim=1, omega_0=30.0):
    """``[(name, (n, *shape))]`` in fit-a-nef's flattening order (SIREN_key: per layer bias, then kernel (in, out)).

    Biases are non-zero so that a bias/kernel mix-up changes the function."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    params = []
    for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        prefix = f"kernel_net_{layer}.linear" if layer < num_layers - 1 else "output_linear"
        bound = 1 / fan_in if layer == 0 else np.sqrt(6 / fan_in) / omega_0
        params.append((f"{prefix}.bias", rng.uniform(-0.5, 0.5, (n, fan_out))))
        params.append((f"{prefix}.kernel", rng.uniform(-bound, bound, (n, fan_in, fan_out)) * 3))
    return params


def flax_siren_forward(params, row, coords, omega_0):
    """fit-a-nef's SIREN in numpy, float64: ``sin(omega_0 (x @ kernel + bias))`` per sine layer, linear output."""
    named = {name: value[row].astype(np.float64) for name, value in params}
    num_layers = len(named) // 2
    x = coords.astype(np.float64)
    for layer in range(num_layers - 1):
        x = np.sin(omega_0 * (x @ named[f"kernel_net_{layer}.linear.kernel"] + named[f"kernel_net_{layer}.linear.bias"]))
    return x @ named["output_linear.kernel"] + named["output_linear.bias"]


def write_arena_file(path, params, labels, label_shape=None):
    """Write one Arena file the way fit-a-nef's ``save`` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.concatenate([value.reshape(len(value), -1) for _, value in params], axis=1).astype(np.float32)
    config = json.dumps([(name, value.shape[1:]) for name, value in params])
    with h5py.File(path, "w") as f:
        f.create_dataset("params", data=flat)
        data = f.create_dataset("param_config", (1,), dtype=h5py.special_dtype(vlen=str))
        data[0] = config
        labels = np.asarray(labels, dtype=np.int32)
        f.create_dataset("labels", data=labels if label_shape is None else labels.reshape(label_shape))
    return flat


def write_nef_json(folder, hidden_dim=8, num_layers=3, omega_0=30.0, output_dim=1):
    folder.mkdir(parents=True, exist_ok=True)
    params = {"hidden_dim": hidden_dim, "num_layers": num_layers, "omega_0": omega_0, "output_dim": output_dim}
    (folder / "nef.json").write_text(json.dumps({"name": "SIREN", "params": params}))


def test_arena_file_converts_to_the_same_function(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "CIFAR10" / "SIREN"
    params = flax_siren_params(rng, 5, in_dim=2, hidden_dim=8, num_layers=4, out_dim=3)
    write_arena_file(folder / "nefs_0-5.hdf5", params, [3, 1, 4, 1, 5])
    write_nef_json(folder, hidden_dim=8, num_layers=4, output_dim=3)

    dataset = read_arena(folder / "nefs_0-5.hdf5")
    spec = get_spec(dataset)
    assert spec == SirenSpec(in_dim=2, out_dim=3, hidden_dim=8, num_layers=4, omega_0=30.0)
    assert dataset["label"] == [3, 1, 4, 1, 5] and dataset["index"] == [0, 1, 2, 3, 4]
    assert "psnr" not in dataset.column_names and get_shared_init(dataset) is None
    source = get_source_info(dataset)
    assert source["kind"] == "image" and source["name"] == "arena/CIFAR10" and source["image_shape"] == [32, 32, 3]

    coords = rng.uniform(-1, 1, (64, 2))
    outputs = siren_forward(spec, weights_tensor(dataset), torch.tensor(coords, dtype=torch.float32))
    for row in range(5):
        expected = flax_siren_forward(params, row, coords, 30.0)
        np.testing.assert_allclose(outputs[row].numpy(), expected, atol=2e-5)


def test_arena_folder_comes_out_in_start_order(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "ShapeNet" / "SIREN"
    write_nef_json(folder, hidden_dim=4, num_layers=3, omega_0=10.0)
    rows = {}
    # "nefs_10-14" sorts before "nefs_4-10" as text: the start index, not the name, must decide.
    for start, end in [(10, 14), (0, 4), (4, 10)]:
        params = flax_siren_params(rng, end - start, in_dim=3, hidden_dim=4, num_layers=3, omega_0=10.0)
        rows[start] = (params, write_arena_file(folder / f"nefs_{start}-{end}.hdf5", params,
                                                np.arange(start, end) % 7, label_shape=(-1, 1)))

    dataset = read_arena(folder)
    assert dataset["index"] == list(range(14))
    assert dataset["label"] == [i % 7 for i in range(14)]
    assert get_source_info(dataset)["kind"] == "occupancy"
    assert [f["file"] for f in get_source_info(dataset)["files"]] == ["nefs_0-4.hdf5", "nefs_4-10.hdf5", "nefs_10-14.hdf5"]
    spec = get_spec(dataset)
    coords = rng.uniform(-1, 1, (32, 3))
    outputs = siren_forward(spec, weights_tensor(dataset), torch.tensor(coords, dtype=torch.float32))
    for start, (params, _) in rows.items():
        for i in range(len(params[0][1])):
            np.testing.assert_allclose(outputs[start + i].numpy(), flax_siren_forward(params, i, coords, 10.0), atol=2e-5)


def write_tiny_arena(folder, ranges):
    """Arena files of the smallest SIREN (2 -> 2 -> 1, 9 weights) whose first weight is the global row number."""
    write_nef_json(folder, hidden_dim=2, num_layers=2, omega_0=8.0)
    rng = np.random.default_rng(2)
    for start, end in ranges:
        params = flax_siren_params(rng, end - start, in_dim=2, hidden_dim=2, num_layers=2)
        params[0] = (params[0][0], np.stack([np.arange(start, end), np.zeros(end - start)], axis=1))
        write_arena_file(folder / f"nefs_{start}-{end}.hdf5", params, np.arange(start, end) % 10)


def test_arena_split_selects_the_release_row_ranges(tmp_path):
    folder = tmp_path / "mnist" / "SIREN"  # the data set name is case-insensitive
    write_tiny_arena(folder, [(0, 50000), (50000, 58000), (58000, 70000)])
    for split, expected in [("train", (0, 55000)), ("val", (55000, 60000)), ("test", (60000, 70000))]:
        dataset = read_arena(folder, split=split)
        index = dataset.with_format("numpy", columns=["index"])[:]["index"]
        np.testing.assert_array_equal(index, np.arange(*expected))
        spec = get_spec(dataset)
        # layers.0.bias[0] carries the row number written into kernel_net_0.linear.bias[0]
        bias_column = dict((name, sl) for name, sl, _ in spec.param_slices())["layers.0.bias"].start
        np.testing.assert_array_equal(weights_tensor(dataset)[:, bias_column].numpy(), np.arange(*expected))
        assert get_source_info(dataset)["split"] == split


def test_arena_without_nef_json_needs_omega_0(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "MNIST" / "SIREN"
    params = flax_siren_params(rng, 3, hidden_dim=6, num_layers=3, omega_0=12.0)
    write_arena_file(folder / "nefs_0-3.hdf5", params, [0, 1, 2])
    with pytest.raises(ValueError, match="omega_0"):
        read_arena(folder)
    dataset = read_arena(folder, omega_0=12.0)
    spec = get_spec(dataset)
    assert spec == SirenSpec(in_dim=2, out_dim=1, hidden_dim=6, num_layers=3, omega_0=12.0)
    coords = rng.uniform(-1, 1, (16, 2))
    outputs = siren_forward(spec, weights_tensor(dataset), torch.tensor(coords, dtype=torch.float32))
    np.testing.assert_allclose(outputs[2].numpy(), flax_siren_forward(params, 2, coords, 12.0), atol=2e-5)


def test_arena_bad_inputs_name_the_file(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "MNIST" / "SIREN"
    write_nef_json(folder)
    good = folder / "nefs_0-4.hdf5"
    write_arena_file(good, flax_siren_params(rng, 4), [0] * 4)
    data = good.read_bytes()

    truncated = tmp_path / "cut" / "nefs_0-4.hdf5"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut/nefs_0-4.hdf5"):
        read_arena(truncated, omega_0=30.0)

    corrupt = tmp_path / "garbled" / "nefs_0-4.hdf5"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x00" * 64 + data[64:])
    with pytest.raises(ValueError, match="garbled/nefs_0-4.hdf5"):
        read_arena(corrupt, omega_0=30.0)

    for missing in ("params", "param_config"):
        path = tmp_path / f"no_{missing}" / "nefs_0-4.hdf5"
        path.parent.mkdir()
        path.write_bytes(data)
        with h5py.File(path, "a") as f:
            del f[missing]
        with pytest.raises(ValueError, match=rf"no_{missing}/nefs_0-4.hdf5.*'{missing}'"):
            read_arena(path, omega_0=30.0)

    narrow = tmp_path / "narrow" / "nefs_0-4.hdf5"
    narrow.parent.mkdir()
    narrow.write_bytes(data)
    with h5py.File(narrow, "a") as f:
        params = f["params"][:, :-1]
        del f["params"]
        f.create_dataset("params", data=params)
    with pytest.raises(ValueError, match="narrow/nefs_0-4.hdf5.*param_config"):
        read_arena(narrow, omega_0=30.0)

    nan = tmp_path / "nan" / "nefs_0-4.hdf5"
    nan.parent.mkdir()
    nan.write_bytes(data)
    with h5py.File(nan, "a") as f:
        f["params"][2, 5] = np.nan
    with pytest.raises(ValueError, match=r"nan/nefs_0-4.hdf5: weights of rows \[2\] contain NaN"):
        read_arena(nan, omega_0=30.0)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: no .hdf5 files"):
        read_arena(empty)

    unknown = tmp_path / "CelebA" / "SIREN"
    unknown.mkdir(parents=True)
    (unknown / "nefs_0-4.hdf5").write_bytes(data)
    with pytest.raises(ValueError, match="no split ranges known for data set 'CelebA'"):
        read_arena(unknown, split="train", omega_0=30.0)
    with pytest.raises(ValueError, match="split must be one of"):
        read_arena(good, split="validation")

    write_nef_json(folder, hidden_dim=16)
    with pytest.raises(ValueError, match="nef.json disagrees"):
        read_arena(good)


# ====================================================================================== HyperDiffusion
class HyperDiffusionEmbedder:
    """Rgtemze/HyperDiffusion embedder.py as MLP3D configures it (include_input, log_sampling, [sin, cos])."""

    def __init__(self, input_dims=3, multires=4):
        self.fns = [lambda x: x]
        for freq in 2.0 ** torch.linspace(0.0, multires - 1, steps=multires):
            for p_fn in (torch.sin, torch.cos):
                self.fns.append(lambda x, p_fn=p_fn, freq=freq: p_fn(x * freq))

    def embed(self, inputs):
        return torch.cat([fn(inputs) for fn in self.fns], -1)


class ReferenceMLP3D(nn.Module):
    """HyperDiffusion's MLP3D (output_type "occ": raw logits), written independently of nef_transformers."""

    def __init__(self, hidden_neurons=(128, 128, 128), multires=4, out_size=1):
        super().__init__()
        self.embedder = HyperDiffusionEmbedder(3, multires)
        in_size = 3 * (1 + 2 * multires)
        sizes = [in_size, *hidden_neurons, out_size]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, coords):
        x = self.embedder.embed(coords)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def make_mlps(folder, names, seed=0, **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    models = {}
    for name in names:
        model = ReferenceMLP3D(**kwargs)
        torch.save(model.state_dict(), folder / name)
        models[name] = model
    return models


def test_positional_encoding_is_hyperdiffusions():
    coords = torch.rand(50, 3) * 2 - 1
    torch.testing.assert_close(positional_encoding(coords, 4), HyperDiffusionEmbedder(3, 4).embed(coords))


def test_hyperdiffusion_folder_converts_to_the_same_function(tmp_path):
    names = ["occ_b_jitter_0_model_final.pth", "occ_a_jitter_0_model_final.pth", "occ_c_jitter_0_model_final.pth"]
    models = make_mlps(tmp_path / "mlps", names)
    dataset = read_hyperdiffusion(tmp_path / "mlps")
    spec = get_spec(dataset)
    assert spec == SirenSpec(in_dim=3, out_dim=1, hidden_dim=128, num_layers=4, activation="relu", num_frequencies=4)
    assert spec.num_params == 36737
    source = get_source_info(dataset)
    assert source["kind"] == "occupancy" and source["files"] == sorted(names)
    assert dataset["label"] == [0, 0, 0] and dataset["index"] == [0, 1, 2]
    assert get_shared_init(dataset) is None

    coords = torch.rand(200, 3) - 0.5
    outputs = siren_forward(spec, weights_tensor(dataset), coords)
    with torch.no_grad():
        for row, name in enumerate(sorted(names)):
            torch.testing.assert_close(outputs[row], models[name](coords), atol=1e-5, rtol=1e-5)


def test_hyperdiffusion_shared_init_and_layouts(tmp_path):
    make_mlps(tmp_path / "classes" / "chair", ["x.pth", "y.pth"], seed=1, hidden_neurons=(16, 16), multires=2)
    make_mlps(tmp_path / "classes" / "airplane", ["z.pth"], seed=2, hidden_neurons=(16, 16), multires=2)
    dataset = read_hyperdiffusion(tmp_path / "classes", shared_init_path=tmp_path / "classes" / "chair" / "x.pth")
    assert dataset["label"] == [0, 1, 1]
    assert get_source_info(dataset)["class_names"] == ["airplane", "chair"]
    assert get_spec(dataset).num_frequencies == 2
    torch.testing.assert_close(get_shared_init(dataset), weights_tensor(dataset)[1])

    # HyperDiffusion's own training output: <folder>/<shape>/checkpoints/model_final.pth
    models = make_mlps(tmp_path / "runs" / "shape_a" / "checkpoints", ["model_final.pth"], seed=3, hidden_neurons=(8,))
    dataset = read_hyperdiffusion(tmp_path / "runs")
    coords = torch.rand(10, 3) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(siren_forward(get_spec(dataset), weights_tensor(dataset), coords)[0],
                                   models["model_final.pth"](coords), atol=1e-5, rtol=1e-5)
    assert nef_metadata(dataset)["source"]["files"] == ["shape_a/checkpoints/model_final.pth"]


class NotATensor:
    pass


def test_hyperdiffusion_bad_inputs_name_the_file(tmp_path):
    make_mlps(tmp_path / "good", ["a.pth"], hidden_neurons=(8, 8))
    data = (tmp_path / "good" / "a.pth").read_bytes()

    def folder_with(name, content):
        folder = tmp_path / name
        folder.mkdir()
        if isinstance(content, bytes):
            (folder / f"{name}.pth").write_bytes(content)
        else:
            torch.save(content, folder / f"{name}.pth")
        return folder

    with pytest.raises(ValueError, match="truncated.pth"):
        read_hyperdiffusion(folder_with("truncated", data[: len(data) // 2]))
    with pytest.raises(ValueError, match="garbled.pth"):
        read_hyperdiffusion(folder_with("garbled", b"\x13\x37" * 32 + data[64:]))
    with pytest.raises(ValueError, match="pickled.pth.*objects other than tensors"):
        read_hyperdiffusion(folder_with("pickled", {"layers.0.weight": NotATensor()}))

    state = torch.load(tmp_path / "good" / "a.pth", weights_only=True)
    with pytest.raises(ValueError, match=r"extra_key.pth: unexpected keys \['embedder.scale'\]"):
        read_hyperdiffusion(folder_with("extra_key", {**state, "embedder.scale": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"bad_shape.pth: layers.1.weight has shape \(8, 9\)"):
        read_hyperdiffusion(folder_with("bad_shape", {**state, "layers.1.weight": torch.zeros(8, 9)}))
    with pytest.raises(ValueError, match=r"missing_bias.pth: missing key 'layers.2.bias'"):
        read_hyperdiffusion(folder_with("missing_bias", {k: v for k, v in state.items() if k != "layers.2.bias"}))
    with pytest.raises(ValueError, match=r"odd_fan_in.pth: layers.0.weight has shape \(8, 26\)"):
        read_hyperdiffusion(folder_with("odd_fan_in", {**state, "layers.0.weight": torch.zeros(8, 26)}))

    mixed = tmp_path / "mixed"
    make_mlps(mixed, ["a.pth"], hidden_neurons=(8, 8))
    make_mlps(mixed, ["b.pth"], hidden_neurons=(4, 4))
    with pytest.raises(ValueError, match="b.pth: describes"):
        read_hyperdiffusion(mixed)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no .pth state dicts"):
        read_hyperdiffusion(tmp_path / "empty")
