"""NefVQTokenizer: BOS/EOS, decoding read off the saved codebooks, save/load and AutoTokenizer round trips,
and one clear error per bad input of issue 3."""

import pytest
import torch

from nef_transformers.data.metadata import make_weight_dataset
from nef_transformers.fields.siren import siren_init
from nef_transformers.fields.spec import SirenSpec
from nef_transformers.tokenization.tokenization_nef_vq import MissingCodebookError, NefVQTokenizer, register_tokenizer
from nef_transformers.tokenization.train import VQTokenizerConfig, train_vq_tokenizer

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)  # 8 + 8 + 1 neurons, 105 parameters


def fields(num=64, seed=0, spec=SPEC):
    generator = torch.Generator().manual_seed(seed)
    init = siren_init(spec, 1, generator=generator)[0]
    return init, init + 0.05 * torch.randn(num, spec.num_params, generator=generator)


@pytest.fixture(scope="module")
def scalar_tokenizer():
    init, weights = fields()
    tokenizer, _ = train_vq_tokenizer(weights, SPEC, init, VQTokenizerConfig(codebook_size=16), progress=False)
    return tokenizer, init, weights


@pytest.fixture(scope="module")
def neuron_tokenizer():
    init, weights = fields()
    config = VQTokenizerConfig(chunking="neuron", levels=(1, 2, 3), codebook_size=8, codebook_grouping="per_layer",
                               batch_size=512)
    tokenizer, _ = train_vq_tokenizer(weights, SPEC, init, config, progress=False)
    return tokenizer, init, weights


def test_sequence_layout_and_special_tokens(scalar_tokenizer, neuron_tokenizer):
    tokenizer, _, weights = scalar_tokenizer
    ids = tokenizer.encode_weights(weights)
    assert ids.dtype == torch.long and ids.shape == (64, 105 + 2)
    assert torch.all(ids[:, 0] == tokenizer.bos_token_id) and torch.all(ids[:, -1] == tokenizer.eos_token_id)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert torch.all(ids[:, 1:-1] >= 3)
    assert len(tokenizer) == tokenizer.vocab_size == 3 + 16
    # the HF path adds BOS/EOS too (HF_NOTES trap 4)
    assert tokenizer.build_inputs_with_special_tokens([5, 6]) == [1, 5, 6, 2]
    tokens = tokenizer.convert_ids_to_tokens(ids[0, :3].tolist())
    assert tokens[0] == "<bos>" and tokens[1].startswith("<g0q0_")
    assert tokenizer.convert_tokens_to_ids(tokens) == ids[0, :3].tolist()

    neuron, _, weights = neuron_tokenizer
    ids = neuron.encode_weights(weights)
    # per layer: 8 neurons x 1 level, 8 neurons x 2 levels, 1 neuron x 3 levels
    assert ids.shape == (64, 8 * 1 + 8 * 2 + 1 * 3 + 2)
    assert len(neuron) == 3 + 8 * (1 + 2 + 3)


def test_structure_ids(neuron_tokenizer):
    tokenizer, _, _ = neuron_tokenizer
    structure = tokenizer.structure_ids()
    assert set(structure) == {"layer_ids", "neuron_ids", "level_ids"}
    expected_layers = [0] + [1] * 8 + [2] * 16 + [3] * 3 + [0]
    expected_neurons = [0] + list(range(1, 9)) + [n for n in range(1, 9) for _ in range(2)] + [1, 1, 1] + [0]
    expected_levels = [0] + [1] * 8 + [1, 2] * 8 + [1, 2, 3] + [0]
    assert structure["layer_ids"].tolist() == expected_layers
    assert structure["neuron_ids"].tolist() == expected_neurons
    assert structure["level_ids"].tolist() == expected_levels
    # allowed ids per position: layer 0 uses ids 3..10 (group 0 level 0), layer 1 levels 0/1 the next two ranges
    ranges = tokenizer.token_id_ranges().tolist()
    assert ranges[0] == [1, 2] and ranges[-1] == [2, 3]
    assert ranges[1:9] == [[3, 11]] * 8
    assert ranges[9:25] == [[11, 19], [19, 27]] * 8
    assert ranges[25:28] == [[27, 35], [35, 43], [43, 51]]


def test_decoding_reads_the_codebooks(scalar_tokenizer):
    """Per-scalar, one level: weight j = init_j + scale_j * codebook[id_j - 3], written out by hand."""
    tokenizer, init, weights = scalar_tokenizer
    ids = tokenizer.encode_weights(weights)
    codebook = tokenizer.quantizer.codebooks[0, 0, :, 0]
    position = tokenizer.chunker.index[:, 0]  # flat parameter of each chunk
    expected = torch.empty_like(weights)
    expected[:, position] = init[position] + tokenizer.scale[:, 0] * codebook[ids[:, 1:-1] - 3]
    assert torch.allclose(tokenizer.decode_weights(ids), expected, atol=1e-7)
    # each scalar gets its nearest code: no other code is closer
    normalised = ((weights - init)[:, position] / tokenizer.scale[:, 0]).unsqueeze(-1)
    distance = (normalised - codebook).abs()
    assert torch.allclose(distance.gather(2, (ids[:, 1:-1] - 3).unsqueeze(-1)), distance.min(-1, keepdim=True).values)
    # decoded values are codes, so encoding them again gives the same ids
    assert torch.equal(tokenizer.encode_weights(tokenizer.decode_weights(ids)), ids)


@pytest.mark.parametrize("which", ["scalar_tokenizer", "neuron_tokenizer"])
def test_save_and_load_give_identical_ids_and_weights(which, request, tmp_path):
    tokenizer, _, weights = request.getfixturevalue(which)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "codebook.safetensors").is_file()
    loaded = NefVQTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode_weights(weights)
    assert torch.equal(loaded.encode_weights(weights), ids)
    assert torch.equal(loaded.decode_weights(ids), tokenizer.decode_weights(ids))
    assert loaded.siren_spec == SPEC and loaded.levels_per_layer == tokenizer.levels_per_layer


def register_auto_classes():
    """``import nef_transformers`` registers the AutoClasses (registration.py calls `register_tokenizer`); the
    explicit call checks that registering twice is harmless."""
    import nef_transformers  # noqa: F401

    register_tokenizer()


def test_auto_tokenizer_loads_the_class(scalar_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    register_auto_classes()
    tokenizer, _, weights = scalar_tokenizer
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, NefVQTokenizer)
    assert torch.equal(loaded.encode_weights(weights), tokenizer.encode_weights(weights))


def test_missing_codebook_file_raises(scalar_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from nef_transformers.models.nef_gpt.configuration_nef_gpt import NefGPTConfig

    register_auto_classes()
    tokenizer, _, _ = scalar_tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "codebook.safetensors").unlink()
    with pytest.raises(MissingCodebookError, match="codebook.safetensors"):
        NefVQTokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(MissingCodebookError, match="codebook.safetensors"):
        AutoTokenizer.from_pretrained(tmp_path / "tok")
    # a model folder with no tokenizer files at all must not build a default tokenizer either (HF_NOTES trap 5)
    NefGPTConfig().save_pretrained(tmp_path / "model")
    with pytest.raises(MissingCodebookError, match="codebook.safetensors"):
        AutoTokenizer.from_pretrained(tmp_path / "model")


def test_bad_token_ids(scalar_tokenizer):
    tokenizer, _, weights = scalar_tokenizer
    ids = tokenizer.encode_weights(weights[:2])
    outside = ids.clone()
    outside[1, 5] = len(tokenizer)
    with pytest.raises(ValueError, match=r"token id 19 \(field 1, position 5\) is outside the vocabulary 0..18"):
        tokenizer.decode_weights(outside)
    negative = ids.clone()
    negative[0, 3] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode_weights(negative)
    middle = ids.clone()
    middle[0, 10] = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="special token <eos> in the middle of field 0"):
        tokenizer.decode_weights(middle)
    no_bos = ids.clone()
    no_bos[1, 0] = 5
    with pytest.raises(ValueError, match="does not start with <bos>"):
        tokenizer.decode_weights(no_bos)
    with pytest.raises(ValueError, match="sequences of length 106 .* 107 ids per field"):
        tokenizer.decode_weights(ids[:, :-1])
    with pytest.raises(TypeError, match="integers"):
        tokenizer.decode_weights(ids.float())


def test_code_of_another_level_is_rejected(neuron_tokenizer):
    tokenizer, _, weights = neuron_tokenizer
    ids = tokenizer.encode_weights(weights[:1])
    # position 9 is the first level of the first neuron of layer 1; give it a code of layer 1's second level
    wrong = ids.clone()
    wrong[0, 9] = int(tokenizer.range_start[1, 1])
    with pytest.raises(ValueError, match="code of group 1 level 1, but that position holds level 0 of layer 1"):
        tokenizer.decode_weights(wrong)


def test_weights_of_another_spec(scalar_tokenizer):
    tokenizer, _, _ = scalar_tokenizer
    other = SirenSpec(in_dim=2, out_dim=1, hidden_dim=16, num_layers=3)
    _, other_weights = fields(num=3, spec=other)
    with pytest.raises(ValueError, match=r"shape \(3, 337\) do not fit this tokenizer's SirenSpec\(.*hidden_dim=8"):
        tokenizer.encode_weights(other_weights)
    same_size = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3, omega_0=10.0)
    with pytest.raises(ValueError, match="belong to .*omega_0=10.0.* trained for .*omega_0=30.0"):
        tokenizer.encode_weights(torch.zeros(1, SPEC.num_params), spec=same_size)
    init, weights = fields(num=4, spec=same_size)
    dataset = make_weight_dataset(weights, [0] * 4, same_size, init, {"kind": "image", "name": "synthetic"})
    with pytest.raises(ValueError, match="dataset holds fields of .*omega_0=10.0"):
        tokenizer.encode_dataset(dataset)
    with pytest.raises(ValueError, match="NaN or inf"):
        tokenizer.encode_weights(torch.full((1, SPEC.num_params), float("nan")))


def test_encode_dataset_checks_the_shared_init(scalar_tokenizer):
    tokenizer, init, weights = scalar_tokenizer
    dataset = make_weight_dataset(weights[:4], [0] * 4, SPEC, init, {"kind": "image", "name": "synthetic"})
    assert torch.equal(tokenizer.encode_dataset(dataset), tokenizer.encode_weights(weights[:4]))
    shifted = make_weight_dataset(weights[:4], [0] * 4, SPEC, init + 1.0, {"kind": "image", "name": "synthetic"})
    with pytest.raises(ValueError, match="shared initialisation differs"):
        tokenizer.encode_dataset(shifted)


def test_vocab_size_mismatch_with_a_model_config(scalar_tokenizer):
    from nef_transformers.models.nef_gpt.configuration_nef_gpt import NefGPTConfig

    tokenizer, _, _ = scalar_tokenizer
    tokenizer.check_vocab_matches(NefGPTConfig(vocab_size=19, max_position_embeddings=128))
    with pytest.raises(ValueError, match="vocab_size is 1027 but this tokenizer has 19 token ids"):
        tokenizer.check_vocab_matches(NefGPTConfig(vocab_size=1027, max_position_embeddings=128))
    with pytest.raises(ValueError, match="at most 64 positions, a field takes 107"):
        tokenizer.check_vocab_matches(NefGPTConfig(vocab_size=19, max_position_embeddings=64))
