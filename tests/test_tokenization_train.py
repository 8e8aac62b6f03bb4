"""train_tokenizer and `nef-transformers tokenize`: every strategy writes a tokenizer that reloads and a
tokenised set that equals what the reloaded tokenizer computes; the learned embedding round-trips its files."""

import argparse
import json

import numpy as np
import pytest
import torch

from nef_transformers.data.metadata import make_weight_dataset
from nef_transformers.fields.siren import siren_init
from nef_transformers.fields.spec import SirenSpec
from nef_transformers.tokenization.chunking import NeuronChunker
from nef_transformers.tokenization.learned import NefAutoencoder, NefAutoencoderConfig, train_autoencoder
from nef_transformers.tokenization.command import add_tokenize_command
from nef_transformers.tokenization.train import VQTokenizerConfig, field_coords, load_tokenization, train_tokenizer

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)
SOURCE = {"kind": "image", "name": "synthetic", "image_shape": [6, 6, 1], "mean": [0.0], "std": [1.0]}


@pytest.fixture(scope="module")
def weight_dataset():
    generator = torch.Generator().manual_seed(0)
    init = siren_init(SPEC, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(48, SPEC.num_params, generator=generator)
    return make_weight_dataset(weights, np.arange(48) % 10, SPEC, init, SOURCE), init, weights


def test_vq_strategy_writes_a_reloadable_tokenizer(weight_dataset, tmp_path):
    dataset, _, weights = weight_dataset
    result = train_tokenizer(dataset, "vq", out_dir=tmp_path, vq_config=VQTokenizerConfig(codebook_size=16),
                             progress=False)
    tokenizer = load_tokenization(tmp_path)
    ids = torch.tensor(result.dataset["input_ids"])
    assert torch.equal(ids, tokenizer.encode_weights(weights).to(ids.dtype))
    assert result.dataset["label"] == dataset["label"] and result.dataset["index"] == dataset["index"]
    info = json.loads((tmp_path / "tokenize.json").read_text())
    assert info["tokens_per_field"] == SPEC.num_params and info["vocab_size"] == 3 + 16
    assert 0.0 < info["codes_in_use"] <= 1.0


def test_naive_strategy_chunks_invert_to_the_weights(weight_dataset, tmp_path):
    dataset, init, weights = weight_dataset
    result = train_tokenizer(dataset, "naive", out_dir=tmp_path, progress=False)
    chunker = load_tokenization(tmp_path)
    assert isinstance(chunker, NeuronChunker) and chunker.mode == "neuron"
    chunks = torch.tensor(np.asarray(result.dataset.with_format("numpy")["chunks"][:]))
    assert chunks.shape == (48, 17, 9)
    # the stored chunks are w - w_init per neuron: back to the weights to within one float32 rounding
    error = (chunker.from_chunks(chunks) - weights).abs()
    assert torch.all(error <= torch.finfo(torch.float32).eps * weights.abs().clamp_min(1.0))


def test_learned_strategy_and_autoencoder_files(weight_dataset, tmp_path):
    dataset, _, weights = weight_dataset
    config = NefAutoencoderConfig(spec=SPEC.to_dict(), latent_dim=4, hidden_size=16, num_heads=2)
    result = train_tokenizer(dataset, "learned", out_dir=tmp_path, autoencoder_config=config, autoencoder_epochs=2,
                             progress=False)
    model = load_tokenization(tmp_path)
    assert isinstance(model, NefAutoencoder)
    latents = torch.tensor(np.asarray(result.dataset.with_format("numpy")["chunks"][:]))
    assert latents.shape == (48, 17, 4)
    with torch.no_grad():
        assert torch.allclose(model.encode(weights), latents, atol=1e-6)
        assert torch.allclose(model.decode(latents), result.tokenizer.decode(latents), atol=1e-6)


def test_autoencoder_learns_and_ignores_padding(weight_dataset):
    _, init, weights = weight_dataset
    config = NefAutoencoderConfig(spec=SPEC.to_dict(), latent_dim=4, hidden_size=16, num_heads=2)
    model, info = train_autoencoder(weights, SPEC, init, field_coords(SOURCE, SPEC), config, epochs=6, batch_size=16,
                                    lr=3e-3, progress=False)
    assert info["loss_curve"][-1] < info["loss_curve"][0]
    with torch.no_grad():
        chunks = model.decode_chunks(model.encode(weights))
    assert torch.all(chunks[:, ~model.chunker.mask] == 0)
    with pytest.raises(ValueError, match=r"expected \(b, 17, 4\)"):
        model.decode(torch.zeros(2, 17, 5))


def test_tokenize_command(weight_dataset, tmp_path, capsys):
    dataset, _, weights = weight_dataset
    dataset.save_to_disk(str(tmp_path / "nefs"))
    parser = argparse.ArgumentParser(prog="nef-transformers")
    add_tokenize_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenize", "--nefs", str(tmp_path / "nefs"), "--strategy", "vq", "--out",
                              str(tmp_path / "out"), "--codebook-size", "8", "--levels", "1"])
    assert args.handler(args) == 0
    assert "48 fields tokenised (vq): 105 tokens per field, vocabulary 11" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer" / "codebook.safetensors").is_file()
    with pytest.raises(ValueError, match="not empty"):
        args.handler(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["tokenize", "--nefs", "x", "--strategy", "bpe", "--out", "y"])


def test_unknown_strategy(weight_dataset):
    with pytest.raises(ValueError, match="strategy must be one of"):
        train_tokenizer(weight_dataset[0], "bpe")


def test_load_tokenization_refuses_a_model_folder(tmp_path):
    from nef_transformers.models.nef_gpt import NefGPTConfig

    NefGPTConfig(vocab_size=16, max_position_embeddings=8, hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds a 'nef_gpt' model, not a tokenizer"):
        load_tokenization(tmp_path)
