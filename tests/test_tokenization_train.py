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


def test_tokenize_command_code_strategy_and_the_shapes_loss(weight_dataset, tmp_path, capsys):
    from nef_transformers.tokenization.code import NefCodeVAE

    dataset, _, weights = weight_dataset
    dataset.save_to_disk(str(tmp_path / "nefs"))
    parser = argparse.ArgumentParser(prog="nef-transformers")
    add_tokenize_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenize", "--nefs", str(tmp_path / "nefs"), "--strategy", "code", "--epochs", "1",
                              "--code-dim", "8", "--code-chunk-width", "2", "--code-steps", "20", "--code-draws", "2",
                              "--out", str(tmp_path / "code")])
    assert args.handler(args) == 0
    assert "48 fields tokenised (code): 4 tokens per field" in capsys.readouterr().out
    vae = load_tokenization(tmp_path / "code")
    assert isinstance(vae, NefCodeVAE) and vae.config.steps == 20 and vae.autoencoder.config.function_loss == "mse"
    from datasets import load_from_disk

    assert len(load_from_disk(str(tmp_path / "code" / "dataset"))) == 2 * 48
    # occupancy fields through the command get the occupancy loss, as through train_tokenizer
    generator = torch.Generator().manual_seed(0)
    init = siren_init(SHAPE_SPEC, 1, generator=generator)[0]
    shapes = make_weight_dataset(init + 0.05 * torch.randn(8, SHAPE_SPEC.num_params, generator=generator),
                                 np.zeros(8, dtype=int), SHAPE_SPEC, init,
                                 {"kind": "occupancy", "name": "synthetic shapes", "class_names": ["blob"]})
    shapes.save_to_disk(str(tmp_path / "shapes"))
    args = parser.parse_args(["tokenize", "--nefs", str(tmp_path / "shapes"), "--strategy", "learned", "--epochs", "1",
                              "--out", str(tmp_path / "learned")])
    assert args.handler(args) == 0
    info = json.loads((tmp_path / "learned" / "tokenize.json").read_text())
    # the default encoder reads the field (a CNN over its outputs on a lattice), saved with the tokenizer
    assert info["settings"]["function_loss"] == "kl" and info["settings"]["encoder"] == "function"
    assert load_tokenization(tmp_path / "learned").config.encoder == "function"
    # --encoder weights: the transformer over the neurons
    args = parser.parse_args(["tokenize", "--nefs", str(tmp_path / "shapes"), "--strategy", "learned", "--epochs", "1",
                              "--encoder", "weights", "--out", str(tmp_path / "neurons")])
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "neurons" / "tokenize.json").read_text())["settings"]["encoder"] == "weights"
    assert load_tokenization(tmp_path / "neurons").config.encoder == "weights"


def test_unknown_strategy(weight_dataset):
    with pytest.raises(ValueError, match="strategy must be one of"):
        train_tokenizer(weight_dataset[0], "bpe")


def test_load_tokenization_refuses_a_model_folder(tmp_path):
    from nef_transformers.models.nef_gpt import NefGPTConfig

    NefGPTConfig(vocab_size=16, max_position_embeddings=8, hidden_size=16, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds a 'nef_gpt' model, not a tokenizer"):
        load_tokenization(tmp_path)


SHAPE_SPEC = SirenSpec(in_dim=3, out_dim=1, hidden_dim=8, num_layers=3)


def test_occupancy_kl_is_the_binary_kl_divergence():
    from nef_transformers.tokenization.learned import occupancy_kl

    generator = torch.Generator().manual_seed(0)
    target, logits = torch.randn(2, 50, 1, generator=generator) * 4, torch.randn(2, 50, 1, generator=generator) * 4
    p, q = torch.sigmoid(target.double()), torch.sigmoid(logits.double())
    brute = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    assert torch.allclose(occupancy_kl(logits, target).double(), brute, rtol=1e-4)
    assert float(occupancy_kl(target, target)) == pytest.approx(0.0, abs=1e-6)
    # far from the surface, a logit's size hardly matters (-20 against -10), its sign does
    assert float(occupancy_kl(torch.full((1,), -20.0), torch.full((1,), -10.0))) < 1e-3  # its logit MSE: 100
    assert float(occupancy_kl(torch.full((1,), 1.0), torch.full((1,), -1.0))) > 0.4


def test_surface_points_lie_nearer_the_decision_boundary():
    from nef_transformers.fields.siren import siren_forward
    from nef_transformers.tokenization.learned import _PointSampler

    spec = SirenSpec(in_dim=3, out_dim=1, hidden_dim=8, num_layers=3, omega_0=5.0)  # smooth at the pool's spacing
    generator = torch.Generator().manual_seed(0)
    weights = siren_init(spec, 1, generator=generator)[0] + 0.1 * torch.randn(4, spec.num_params, generator=generator)
    pool = torch.rand(4096, 3, generator=generator) - 0.5
    draw = _PointSampler(spec, weights, pool, 512, 0.5, torch.Generator().manual_seed(1), progress=False)
    points = draw(torch.tensor([2, 0]))
    assert points.shape == (2, 512, 3)
    assert torch.equal(points[0, :256], points[1, :256])  # the uniform half is shared by the batch
    outputs = siren_forward(spec, weights[[2, 0]], points).abs()[..., 0]
    assert torch.all(outputs[:, 256:].median(1).values < 0.5 * outputs[:, :256].median(1).values)
    # seeded: the same generator state gives the same points
    again = _PointSampler(spec, weights, pool, 512, 0.5, torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(again(torch.tensor([2, 0])), points)


def test_autoencoder_with_the_occupancy_loss_learns_and_saves_it(tmp_path):
    generator = torch.Generator().manual_seed(0)
    init = siren_init(SHAPE_SPEC, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(32, SHAPE_SPEC.num_params, generator=generator)
    config = NefAutoencoderConfig(spec=SHAPE_SPEC.to_dict(), latent_dim=4, hidden_size=16, num_heads=2,
                                  function_loss="kl")
    pool = torch.rand(2048, 3, generator=generator) - 0.5
    model, info = train_autoencoder(weights, SHAPE_SPEC, init, pool, config, epochs=6, batch_size=16, lr=3e-3,
                                    progress=False, points_per_step=256, surface_fraction=0.5)
    assert info["loss_curve"][-1] < info["loss_curve"][0] and info["function_kl"] >= 0
    model.save_pretrained(tmp_path)
    assert NefAutoencoder.from_pretrained(tmp_path).config.function_loss == "kl"


def test_autoencoder_refuses_bad_loss_and_point_settings(weight_dataset):
    _, init, weights = weight_dataset
    with pytest.raises(ValueError, match="function_loss must be one of"):
        NefAutoencoderConfig(spec=SPEC.to_dict(), function_loss="l1")
    coords = field_coords(SOURCE, SPEC)
    for settings, message in (({"points_per_step": 37}, r"points_per_step must be in \[1, 36\]"),
                              ({"surface_fraction": 0.5}, "needs points_per_step"),
                              ({"points_per_step": 8, "surface_fraction": 1.5}, r"surface_fraction must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            train_autoencoder(weights, SPEC, init, coords, epochs=1, progress=False, **settings)


def test_learned_strategy_picks_the_loss_by_source_kind(weight_dataset):
    from nef_transformers.tokenization.train import (
        AUTOENCODER_BATCH_SIZE, SHAPE_AUTOENCODER_BATCH_SIZE, SHAPE_AUTOENCODER_POINTS, SHAPE_AUTOENCODER_SURFACE)

    generator = torch.Generator().manual_seed(0)
    init = siren_init(SHAPE_SPEC, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(8, SHAPE_SPEC.num_params, generator=generator)
    shapes = make_weight_dataset(weights, np.zeros(8, dtype=int), SHAPE_SPEC, init,
                                 {"kind": "occupancy", "name": "synthetic shapes", "class_names": ["blob"]})
    occupancy = train_tokenizer(shapes, "learned", autoencoder_epochs=1, progress=False).info
    assert occupancy["settings"]["function_loss"] == "kl" and "function_kl" in occupancy
    assert occupancy["points_per_step"] == SHAPE_AUTOENCODER_POINTS
    assert occupancy["surface_fraction"] == SHAPE_AUTOENCODER_SURFACE
    assert occupancy["batch_size"] == SHAPE_AUTOENCODER_BATCH_SIZE != AUTOENCODER_BATCH_SIZE
    images = train_tokenizer(weight_dataset[0], "learned", autoencoder_epochs=1, progress=False).info
    assert images["settings"]["function_loss"] == "mse" and "points_per_step" not in images
    assert images["batch_size"] == AUTOENCODER_BATCH_SIZE


def test_latent_noise_is_training_only_and_relative_to_the_latents_spread(weight_dataset, tmp_path):
    _, init, weights = weight_dataset
    coords = field_coords(SOURCE, SPEC)
    config = NefAutoencoderConfig(spec=SPEC.to_dict(), latent_dim=4, hidden_size=16, num_heads=2, latent_noise=0.5)
    model = NefAutoencoder(config, init)

    def loss(module, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return float(module.loss(weights, coords)[0])

    model.train()
    noisy = [loss(model, 0), loss(model, 0), loss(model, 1)]
    assert noisy[0] == noisy[1] != noisy[2]  # seeded noise
    plain = NefAutoencoder(NefAutoencoderConfig(**{**config.__dict__, "latent_noise": 0.0}), init)
    plain.load_state_dict(model.state_dict())
    plain.train()
    assert loss(plain, 0) == loss(plain, 1) != noisy[0]
    model.eval()
    assert loss(model, 0) == loss(model, 1) == pytest.approx(loss(plain, 0), rel=1e-5)  # no noise outside training
    # latents ten times larger (and a decoder that undoes it): the same function, and the same noisy loss, since the
    # noise follows the latents' spread; the encoder cannot grow its way out of it
    scaled = NefAutoencoder(config, init)
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.to_latent.weight.mul_(10)
        scaled.to_latent.bias.mul_(10)
        scaled.decoder_in.weight.div_(10)
    model.train()
    scaled.train()
    assert loss(scaled, 0) == pytest.approx(noisy[0], rel=1e-4)
    model.save_pretrained(tmp_path)
    assert NefAutoencoder.from_pretrained(tmp_path).config.latent_noise == 0.5
    with pytest.raises(ValueError, match="latent_noise must be >= 0, got -0.1"):
        NefAutoencoderConfig(spec=SPEC.to_dict(), latent_noise=-0.1)


@pytest.mark.parametrize("spec", [SPEC, SHAPE_SPEC], ids=["image", "shape"])
def test_function_encoder_reads_the_field_not_its_weights(spec):
    from nef_transformers.tokenization.permutation import permute_hidden_units

    generator = torch.Generator().manual_seed(0)
    init = siren_init(spec, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(4, spec.num_params, generator=generator)
    perms = [torch.stack([torch.randperm(spec.hidden_dim, generator=generator) for _ in range(4)])
             for _ in range(spec.num_layers - 1)]
    permuted = permute_hidden_units(spec, weights, perms)
    assert not torch.allclose(permuted, weights)
    loss = "kl" if spec.in_dim == 3 else "mse"
    reads_field = NefAutoencoder(NefAutoencoderConfig(spec=spec.to_dict(), hidden_size=16, num_heads=2,
                                                      function_loss=loss, encoder="function",
                                                      encoder_resolution=16), init).eval()
    reads_weights = NefAutoencoder(NefAutoencoderConfig(spec=spec.to_dict(), hidden_size=16, num_heads=2,
                                                        function_loss=loss), init).eval()
    with torch.no_grad():
        latents = reads_field.encode(weights)
        assert latents.shape == (4, reads_field.num_tokens, 4)
        # the same functions drawn by other weights: the same latents; the neuron encoder sees other weights
        assert torch.allclose(reads_field.encode(permuted), latents, atol=1e-5)
        assert not torch.allclose(reads_weights.encode(permuted), reads_weights.encode(weights), atol=1e-3)
        # other fields: other latents
        assert not torch.allclose(reads_field.encode(weights.roll(1, 0)), latents, atol=1e-3)
    if spec.in_dim == 3:  # the CNN sees the occupancy volume the renderer computes, laid out as a volume
        from nef_transformers.fields.render import occupancy_grid

        seen = []
        hook = reads_field.field_encoder[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            reads_field.encode(weights)
        hook.remove()
        expected = torch.sigmoid(occupancy_grid(spec, weights, resolution=16)) - 0.5
        assert torch.allclose(seen[0], expected.unsqueeze(1), atol=1e-6)


def test_function_encoder_trains_saves_and_reloads(tmp_path):
    generator = torch.Generator().manual_seed(0)
    init = siren_init(SHAPE_SPEC, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(32, SHAPE_SPEC.num_params, generator=generator)
    config = NefAutoencoderConfig(spec=SHAPE_SPEC.to_dict(), hidden_size=16, num_heads=2, function_loss="kl",
                                  encoder="function", encoder_resolution=8)
    pool = torch.rand(2048, 3, generator=generator) - 0.5
    model, info = train_autoencoder(weights, SHAPE_SPEC, init, pool, config, epochs=6, batch_size=16, lr=3e-3,
                                    progress=False, points_per_step=256, surface_fraction=0.5)
    assert info["loss_curve"][-1] < info["loss_curve"][0]
    assert not any(key.startswith(("encoder", "to_latent")) for key in model.state_dict())  # no unused encoder
    assert "lattice" not in model.state_dict()  # rebuilt from the config, not saved
    model.save_pretrained(tmp_path)
    again = NefAutoencoder.from_pretrained(tmp_path)
    assert again.config.encoder == "function" and again.config.encoder_resolution == 8
    with torch.no_grad():
        assert torch.equal(again.encode(weights), model.encode(weights))
        assert torch.equal(again(weights)[0], model(weights)[0])


def test_function_encoder_settings_are_checked():
    with pytest.raises(ValueError, match=r"encoder must be one of \('weights', 'function'\), got 'pixels'"):
        NefAutoencoderConfig(spec=SPEC.to_dict(), encoder="pixels")
    with pytest.raises(ValueError, match="encoder_resolution must be a multiple of 8 .* got 20"):
        NefAutoencoderConfig(spec=SPEC.to_dict(), encoder="function", encoder_resolution=20)
    line = SirenSpec(in_dim=1, out_dim=1, hidden_dim=8, num_layers=2)
    with pytest.raises(ValueError, match="2-D or 3-D lattice; the spec's fields take 1-D inputs"):
        NefAutoencoderConfig(spec=line.to_dict(), encoder="function")
    NefAutoencoderConfig(spec=line.to_dict())  # the neuron encoder takes any input dimension
