"""NeuronChunker: chunk layout read off `SirenSpec.unflatten`, exact round trips, saved chunkers."""

import pytest
import torch

from nef_transformers.fields.siren import siren_init
from nef_transformers.fields.spec import SirenSpec
from nef_transformers.tokenization.chunking import NeuronChunker

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=6, num_layers=3)


def random_fields(spec, num=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    init = siren_init(spec, 1, generator=generator)[0]
    weights = init + 0.1 * torch.randn(num, spec.num_params, generator=generator)
    return init, weights


def test_neuron_chunks_are_rows_plus_bias_minus_init():
    init, weights = random_fields(SPEC)
    chunker = NeuronChunker(SPEC, init, "neuron")
    chunks = chunker.to_chunks(weights)
    # 6 + 6 + 1 neurons; the widest row is a hidden neuron's 6 inputs + bias.
    assert chunks.shape == (5, 13, 7)
    assert chunker.widths.tolist() == [3] * 6 + [7] * 6 + [7]
    assert chunker.layer_ids.tolist() == [0] * 6 + [1] * 6 + [2]
    assert chunker.neuron_ids.tolist() == list(range(6)) + list(range(6)) + [0]
    params = SPEC.unflatten(weights - init)
    for t, (layer, neuron) in enumerate(zip(chunker.layer_ids.tolist(), chunker.neuron_ids.tolist())):
        row = params[f"layers.{layer}.weight"][:, neuron]
        bias = params[f"layers.{layer}.bias"][:, neuron : neuron + 1]
        expected = torch.cat([row, bias], dim=1)
        width = expected.shape[1]
        assert torch.equal(chunks[:, t, :width], expected)
        assert torch.all(chunks[:, t, width:] == 0)
        assert chunker.mask[t].tolist() == [True] * width + [False] * (7 - width)


def test_scalar_chunks_follow_canonical_order():
    init, weights = random_fields(SPEC)
    chunker = NeuronChunker(SPEC, None, "scalar")
    chunks = chunker.to_chunks(weights)
    assert chunks.shape == (5, SPEC.num_params, 1)
    assert chunker.mask.all()
    # structure of parameter layers.1.weight[j, i]: layer 1, neuron j, slot i; layers.1.bias[j]: slot = fan_in
    order = []
    for name, _, shape in SPEC.param_slices():
        layer = int(name.split(".")[1])
        if name.endswith("weight"):
            order += [(layer, j, i) for j in range(shape[0]) for i in range(shape[1])]
        else:
            order += [(layer, j, SPEC.layer_dims[layer][0]) for j in range(shape[0])]
    got = list(zip(chunker.layer_ids.tolist(), chunker.neuron_ids.tolist(), chunker.slot_ids.tolist()))
    assert sorted(got) == sorted(order)
    # each chunk holds the parameter its index points at
    assert torch.equal(chunks[:, :, 0], weights[:, chunker.index[:, 0]])


@pytest.mark.parametrize("mode", ["neuron", "scalar"])
def test_round_trip_is_exact(mode):
    init, weights = random_fields(SPEC, num=7)
    # float64: the subtraction of float32 values is exact, so the round trip is bit-exact
    chunker = NeuronChunker(SPEC, init.double(), mode)
    assert torch.equal(chunker.from_chunks(chunker.to_chunks(weights.double())), weights.double())
    # no shared init: a pure gather/scatter, bit-exact in float32
    plain = NeuronChunker(SPEC, None, mode)
    assert torch.equal(plain.from_chunks(plain.to_chunks(weights)), weights)
    # float32 with a shared init: within one rounding of the residual
    chunker32 = NeuronChunker(SPEC, init, mode)
    error = (chunker32.from_chunks(chunker32.to_chunks(weights)) - weights).abs()
    assert torch.all(error <= torch.finfo(torch.float32).eps * weights.abs().clamp_min(1.0))


def test_padding_is_ignored_on_the_way_back():
    init, weights = random_fields(SPEC)
    chunker = NeuronChunker(SPEC, init, "neuron")
    chunks = chunker.to_chunks(weights.double())
    noisy = chunks.masked_fill(~chunker.mask, 123.0)
    assert torch.equal(chunker.from_chunks(noisy), chunker.from_chunks(chunks))


def test_bad_inputs_name_the_mismatch():
    init, weights = random_fields(SPEC)
    chunker = NeuronChunker(SPEC, init)
    with pytest.raises(ValueError, match=r"expected \(b, 13, 7\)"):
        chunker.from_chunks(torch.zeros(2, 12, 7))
    with pytest.raises(ValueError, match="do not fit"):
        chunker.to_chunks(torch.zeros(2, SPEC.num_params + 1))
    with pytest.raises(ValueError, match="shared_init has 3 values"):
        NeuronChunker(SPEC, torch.zeros(3))
    with pytest.raises(ValueError, match="chunking mode"):
        NeuronChunker(SPEC, init, mode="layer")


def test_save_and_load(tmp_path):
    init, weights = random_fields(SPEC)
    chunker = NeuronChunker(SPEC, init, "neuron")
    chunker.save_pretrained(tmp_path)
    loaded = NeuronChunker.from_pretrained(tmp_path)
    assert loaded.spec == SPEC and loaded.mode == "neuron"
    assert torch.equal(loaded.to_chunks(weights), chunker.to_chunks(weights))
    (tmp_path / "shared_init.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shared_init.safetensors"):
        NeuronChunker.from_pretrained(tmp_path)
