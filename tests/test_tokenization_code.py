"""The code strategy: `NefCodeVAE` (a VAE over a `NefAutoencoder`'s latents in shape-weighted coordinates), its
decoder metric, files, training, and its place in `train_tokenizer`, `load_tokenization` and the pipeline."""

import json

import numpy as np
import pytest
import torch

from nef_transformers.data.metadata import make_weight_dataset
from nef_transformers.fields.siren import siren_init
from nef_transformers.fields.spec import SirenSpec
from nef_transformers.tokenization.code import (NefCodeConfig, NefCodeVAE, decoder_metric, posterior_draws,
                                                train_code_vae)
from nef_transformers.tokenization.learned import NefAutoencoder, NefAutoencoderConfig
from nef_transformers.tokenization.train import load_tokenization, train_tokenizer

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)
SOURCE = {"kind": "image", "name": "synthetic", "image_shape": [6, 6, 1], "mean": [0.0], "std": [1.0]}
SMALL = dict(code_dim=8, chunk_width=2, width=32, steps=300, batch_size=16, metric_items=6, draws=3)


def tiny_autoencoder(dtype=torch.float32):
    torch.manual_seed(0)
    init = siren_init(SPEC, 1, generator=torch.Generator().manual_seed(0))[0]
    config = NefAutoencoderConfig(spec=SPEC.to_dict(), latent_dim=2, hidden_size=8, num_heads=2)
    return NefAutoencoder(config, init).eval().to(dtype), init


@pytest.fixture(scope="module")
def trained():
    autoencoder, init = tiny_autoencoder()
    generator = torch.Generator().manual_seed(1)
    weights = init + 0.05 * torch.randn(40, SPEC.num_params, generator=generator)
    model, stats = train_code_vae(autoencoder, weights, "image", NefCodeConfig(**SMALL), progress=False)
    return model, stats, weights


def test_decoder_metric_is_the_mean_of_the_exact_jacobians_gram_matrices():
    from nef_transformers.data.images import image_grid
    from nef_transformers.fields.siren import siren_forward

    autoencoder, _ = tiny_autoencoder(torch.float64)
    latents = torch.randn(5, autoencoder.num_tokens, 2, dtype=torch.float64)
    metric = decoder_metric(autoencoder, "image", latents, items=3, step=1e-4, progress=False)
    chosen = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:3]
    grid = image_grid(14, 14).double()

    def outputs(flat):
        return siren_forward(SPEC, autoencoder.decode(flat.view(1, *latents.shape[1:])), grid).flatten()

    jacobians = [torch.autograd.functional.jacobian(outputs, latents[i].flatten()) for i in chosen]
    expected = sum(j.T @ j for j in jacobians) / 3
    assert metric.shape == (latents[0].numel(),) * 2 and torch.allclose(metric, metric.T)
    # central differences of step 1e-4 against autograd: agree to 0.2 % of the largest entry
    assert torch.allclose(metric, expected, rtol=1e-2, atol=2e-3 * float(expected.abs().max()))
    # a different choice of fields gives a different metric: the seed picks which fields
    assert not torch.allclose(metric, decoder_metric(autoencoder, "image", latents, items=3, step=1e-4, seed=1,
                                                     progress=False))
    with pytest.raises(ValueError, match="kind must be 'occupancy'"):
        decoder_metric(autoencoder, "voxels", latents, items=3)


def test_coordinates_invert_and_codes_round_trip_their_files(trained, tmp_path):
    model, _, weights = trained
    with torch.no_grad():
        latents = model.autoencoder.encode(weights)
        back = model.from_coordinates(model.to_coordinates(latents))
        assert torch.allclose(back, latents, atol=1e-4 * float(latents.abs().max()))
        codes = model.encode(weights)
        assert codes.shape == (40, 4, 2)
        decoded = model.decode(codes)
        # (b, t, w) and flat (b, c) codes decode alike
        assert torch.equal(decoded, model.decode(codes.flatten(1)))
    model.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    assert settings["model_type"] == "nef_code_vae" and settings["autoencoder"]["latent_dim"] == 2
    reloaded = load_tokenization(tmp_path)
    assert isinstance(reloaded, NefCodeVAE) and reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(reloaded.encode(weights), codes) and torch.equal(reloaded.decode(codes), decoded)
    assert torch.equal(reloaded.order, model.order)
    with pytest.raises(ValueError, match=r"expected \(b, 4, 2\) or \(b, 8\)"):
        model.decode(torch.zeros(2, 4, 3))
    # a folder missing its weights, or holding another model, is refused rather than filled with defaults
    (tmp_path / "config.json").write_text(json.dumps({**settings, "model_type": "nef_gpt"}))
    with pytest.raises(ValueError, match="does not describe a NefCodeVAE"):
        NefCodeVAE.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        NefCodeVAE.from_pretrained(tmp_path)


def test_training_reconstructs_and_can_sort_the_codes(trained):
    model, stats, weights = trained
    # the coordinates have unit RMS: predicting their mean scores 1; the VAE's reconstructions do better
    assert stats["reconstruction_mse"] < 0.5
    spread = stats["code_spread"]
    assert len(spread) == 8 and torch.equal(model.order, torch.arange(8))  # the VAE's own order by default
    with torch.no_grad():
        codes = model.encode(weights).flatten(1)
    assert torch.allclose(codes.std(0), torch.tensor(spread), atol=1e-3)
    # seeded: the same settings give the same model; sort_codes only permutes its codes, by spread
    config = NefCodeConfig(**{**SMALL, "sort_codes": True})
    ordered, ordered_stats = train_code_vae(model.autoencoder, weights, "image", config, progress=False)
    assert ordered_stats["code_spread"] == sorted(spread, reverse=True)
    with torch.no_grad():
        assert torch.equal(ordered.encode(weights).flatten(1), codes[:, ordered.order])
        assert torch.allclose(ordered.decode(ordered.encode(weights)), model.decode(model.encode(weights)), atol=1e-6)


def test_posterior_draws_scatter_around_the_means(trained):
    model, _, weights = trained
    with torch.no_grad():
        means = model.encode(weights)
        _, log_var = model.posterior(model.to_coordinates(model.autoencoder.encode(weights)))
    assert torch.equal(posterior_draws(model, weights, 0), means)
    draws = posterior_draws(model, weights, 200, seed=3)
    assert draws.shape == (200 * 40, 4, 2)
    rounds = draws.view(200, 40, 8)
    assert torch.allclose(rounds.mean(0), means.flatten(1), atol=0.35)
    # each field's draws spread as its posterior says (std within 20 % over 200 draws)
    ratio = rounds.std(0) / (0.5 * log_var).exp()
    assert float((ratio - 1).abs().max()) < 0.2
    assert torch.equal(draws, posterior_draws(model, weights, 200, seed=3))


def test_code_strategy_writes_draws_and_a_generation_folder(trained, tmp_path):
    from transformers import pipeline

    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForWeightRegression
    from nef_transformers.pipelines.neural_field_generation import TASK

    model, _, weights = trained
    _, init = tiny_autoencoder()
    dataset = make_weight_dataset(weights, np.arange(40) % 10, SPEC, init, SOURCE)
    result = train_tokenizer(dataset, "code", out_dir=tmp_path, autoencoder=model.autoencoder,
                             code_config=NefCodeConfig(**SMALL), progress=False)
    chunks = torch.tensor(np.asarray(result.dataset.with_format("numpy")["chunks"][:]))
    assert chunks.shape == (3 * 40, 4, 2)
    assert result.dataset["index"] == list(dataset["index"]) * 3
    assert result.dataset["label"] == list(dataset["label"]) * 3
    assert torch.allclose(chunks, posterior_draws(result.tokenizer, weights, 3), atol=1e-6)
    info = json.loads((tmp_path / "tokenize.json").read_text())
    assert info["tokens_per_field"] == 4 and info["rows_per_field"] == 3 and info["strategy"] == "code"
    vae = load_tokenization(tmp_path)
    assert isinstance(vae, NefCodeVAE)
    other = SirenSpec(in_dim=2, out_dim=1, hidden_dim=4, num_layers=3)
    wrong = make_weight_dataset(siren_init(other, 4), np.arange(4), other, None, SOURCE)
    with pytest.raises(ValueError, match="the autoencoder decodes"):
        train_tokenizer(wrong, "code", autoencoder=model.autoencoder, progress=False)
    # NefGPT over the codes: the pipeline decodes its samples through the VAE, then the autoencoder
    config = NefGPTConfig(chunk_dim=2, max_position_embeddings=4, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_mixtures=2, field_spec=SPEC.to_dict(), field_source=SOURCE)
    gpt = NefGPTForWeightRegression(config).eval()
    pipe = pipeline(TASK, model=gpt, tokenizer=vae)
    options = dict(num_samples=3, seed=2, top_k=1, temperature=0.8, output_type="weights")
    sampled = torch.stack([s["weights"] for s in pipe(**options)])
    with torch.no_grad():
        assert torch.equal(sampled, vae.decode(gpt.sample(3, seed=2, top_k=1, temperature=0.8)))
    pipe.save_pretrained(tmp_path / "gpt")
    reloaded = pipeline(TASK, model=str(tmp_path / "gpt"))
    assert isinstance(reloaded.tokenizer, NefCodeVAE)
    assert torch.equal(torch.stack([s["weights"] for s in reloaded(**options)]), sampled)
    # a model whose chunks do not fit the codes is refused
    with pytest.raises(ValueError, match=r"decodes \(4, 2\)"):
        pipeline(TASK, model=NefGPTForWeightRegression(NefGPTConfig(**{**config.to_dict(), "chunk_dim": 3})),
                 tokenizer=vae)


def test_drop_inactive_keeps_the_dimensions_in_use_and_decodes_the_rest_at_zero(tmp_path):
    from safetensors.torch import load_file, save_file

    autoencoder, init = tiny_autoencoder()
    weights = init + 0.05 * torch.randn(40, SPEC.num_params, generator=torch.Generator().manual_seed(1))
    # a strong pull to the prior (sigma2 3) leaves some of 16 dimensions unused
    settings = {**SMALL, "code_dim": 16, "sigma2": 3.0, "steps": 600}
    full, full_stats = train_code_vae(autoencoder, weights, "image", NefCodeConfig(**settings), progress=False)
    model, stats = train_code_vae(autoencoder, weights, "image", NefCodeConfig(**settings, drop_inactive=True),
                                  progress=False)
    spread = torch.tensor(stats["code_spread"])  # in the sorted order
    active = int((spread > 0.1).sum())
    assert 0 < active < 15 and stats["active_dims"] == active == full_stats["active_dims"]
    # kept: the dimensions in use, padded with the next ones to whole chunks of 2
    assert stats["kept_dims"] == model.code_length == 2 * ((active + 1) // 2) < 16
    assert torch.equal(spread, spread.sort(descending=True).values)
    with torch.no_grad():
        codes = model.encode(weights)
        assert codes.shape == (40, model.code_length // 2, 2) and model.num_tokens == model.code_length // 2
        # the same VAE (seeded) as without drop_inactive: its sorted means, cut after the kept dimensions
        means = full.encode(weights).flatten(1)[:, model.order]
        assert torch.allclose(codes.flatten(1), means[:, :model.code_length], atol=1e-6)
        # decoding puts the dropped dimensions at 0: as the full VAE decoding those means with the rest zeroed
        zeroed = means.clone()
        zeroed[:, model.code_length:] = 0
        assert torch.allclose(model.decode(codes), full.decode(zeroed[:, model.order.argsort()]), atol=1e-5)
        # the unused dimensions hardly move the fields (why dropping them is safe)
        error = (model.decode(codes) - full.decode(full.encode(weights))).abs().max()
        assert float(error) < 0.05 * float((weights - weights.mean(0)).abs().max())
    assert posterior_draws(model, weights, 3).shape == (3 * 40, model.num_tokens, 2)
    with pytest.raises(ValueError, match=rf"expected \(b, {model.num_tokens}, 2\) or \(b, {model.code_length}\)"):
        model.decode(torch.zeros(2, 16))
    # the kept count travels with the files; a file without it is refused, unless written before the option existed
    model.save_pretrained(tmp_path)
    reloaded = NefCodeVAE.from_pretrained(tmp_path)
    assert reloaded.code_length == model.code_length and reloaded.config.drop_inactive
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "kept"}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="kept"):
        NefCodeVAE.from_pretrained(tmp_path)
    settings_file = tmp_path / "config.json"
    older = {k: v for k, v in json.loads(settings_file.read_text()).items() if k != "drop_inactive"}
    settings_file.write_text(json.dumps(older))
    assert NefCodeVAE.from_pretrained(tmp_path).code_length == 16  # before drop_inactive: every dimension
    with pytest.raises(ValueError, match=r"kept \(3\) must be a multiple of chunk_width \(2\)"):
        NefCodeVAE(NefCodeConfig(**settings), autoencoder, kept=3)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"chunk_width \(3\) must divide code_dim \(32\)"):
        NefCodeConfig(chunk_width=3)
    with pytest.raises(ValueError, match="sigma2 must be > 0"):
        NefCodeConfig(sigma2=0.0)
    with pytest.raises(ValueError, match="draws must be an int >= 0"):
        NefCodeConfig(draws=-1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        NefCodeConfig(steps=0)


def test_training_holds_out_whole_fields_when_rows_repeat(tmp_path):
    from datasets import Dataset

    from nef_transformers.training import load_splits

    rows = Dataset.from_dict({"chunks": torch.randn(3 * 20, 4, 2).tolist(), "index": list(range(20)) * 3,
                              "label": [0] * 60})
    rows.save_to_disk(str(tmp_path / "draws"))
    train, validation = load_splits(str(tmp_path / "draws"), 0.1, seed=0)
    assert len(validation) == 3 * 2 and len(train) == 3 * 18  # 2 of 20 fields, with all three of their rows
    assert not set(train["index"]) & set(validation["index"])
    again, _ = load_splits(str(tmp_path / "draws"), 0.1, seed=0)
    assert again["index"] == train["index"]
    # one row per field: the plain row split, as before
    Dataset.from_dict({"chunks": torch.randn(20, 4, 2).tolist(), "index": list(range(20)), "label": [0] * 20}) \
        .save_to_disk(str(tmp_path / "means"))
    train, validation = load_splits(str(tmp_path / "means"), 0.1, seed=0)
    assert len(validation) == 2 and len(train) == 18


def test_tuning_to_the_prior_leaves_the_codes_and_lowers_the_cycle_error(trained):
    import copy

    from nef_transformers.data.images import image_grid
    from nef_transformers.tokenization.code import ACTIVE_SPREAD, cycle_error, tune_decoder_to_prior

    model, _, weights = trained
    generator = torch.Generator().manual_seed(3)
    prior = torch.randn(300, model.num_tokens, model.chunk_width, generator=generator)  # codes a prior drew
    pool, probe = prior[:200], prior[200:]
    coords = image_grid(6, 6)
    with torch.no_grad():
        means = posterior_draws(model, weights, 0).flatten(1)
    active = means.std(0) > ACTIVE_SPREAD
    assert active.any()

    def tuned(cycle_weight):
        copied = copy.deepcopy(model)
        history = tune_decoder_to_prior(copied, weights, pool, coords, epochs=30, cycle_weight=cycle_weight, lr=1e-2,
                                        batch_size=8, seed=0, progress=False)
        return copied, history

    with torch.no_grad():
        before = float(cycle_error(model, probe, active))
    cycled, history = tuned(1.0)
    plain, _ = tuned(0.0)
    with torch.no_grad():
        after, without = float(cycle_error(cycled, probe, active)), float(cycle_error(plain, probe, active))
        # the encoders did not move: the training fields' codes (what a prior was trained on) are the same
        assert torch.equal(cycled.encode(weights), model.encode(weights))
    assert history["active_dims"] == int(active.sum()) and len(history["cycle"]) == 30
    assert after < 0.7 * before and after < 0.7 * without, (before, after, without)
    decoders = [name for name, _ in cycled.named_parameters() if name.startswith(("decoder", "autoencoder.decoder"))]
    original = dict(model.named_parameters())
    changed = {name for name, p in cycled.named_parameters() if not torch.equal(p, original[name])}
    assert changed == set(decoders), "exactly the decoders were tuned"
    assert [p.requires_grad for p in cycled.parameters()] == [p.requires_grad for p in model.parameters()], \
        "the grad flags are given back"


def test_field_mmd_matches_a_brute_force_reference_and_tells_sets_apart():
    from nef_transformers.tokenization.code import field_mmd

    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 10, generator=generator, dtype=torch.float64), \
        torch.randn(5, 10, generator=generator, dtype=torch.float64) + 0.5
    a, b = x.numpy(), y.numpy()
    both = np.concatenate([a, b])
    d = np.array([[np.mean((p - q) ** 2) for q in both] for p in both])
    h = np.median(d[~np.eye(len(both), dtype=bool)])
    k = sum(np.exp(-d / (s * h)) for s in (0.5, 1.0, 2.0))
    m, r = len(a), len(b)
    expected = ((k[:m, :m].sum() - np.trace(k[:m, :m])) / (m * (m - 1))
                + (k[m:, m:].sum() - np.trace(k[m:, m:])) / (r * (r - 1)) - 2 * k[:m, m:].mean())
    assert float(field_mmd(x, y)) == pytest.approx(expected, rel=1e-9)
    # unbiased: about 0 on average for two sets from one distribution, clearly above it for shifted sets
    same = [float(field_mmd(torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)))
            for _ in range(200)]
    shifted = [float(field_mmd(torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator) + 1))
               for _ in range(50)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    assert np.mean(shifted) > 10 * np.std(same) / np.sqrt(len(same)) and min(shifted) > 0
    # the gradient pulls bunched samples apart: a step against it spreads them
    bunched = (0.01 * torch.randn(8, 10, generator=generator)).requires_grad_(True)
    references = torch.randn(8, 10, generator=generator)
    field_mmd(bunched, references).backward()
    moved = bunched.detach() - 5.0 * bunched.grad
    assert torch.pdist(moved).mean() > torch.pdist(bunched.detach()).mean()
    with pytest.raises(ValueError, match="the same values per field"):
        field_mmd(x, y[:, :4])
    with pytest.raises(ValueError, match="at least 2 samples"):
        field_mmd(x[:1], y)


def test_the_realism_term_steps_the_decoders_down_its_mmd_and_leaves_the_encoders(trained):
    # One step on every training field at once (batch = all 40), with a prior of one code (so the step's prior batch
    # is 40 copies of it): the step's MMD term can be computed exactly here, before and after. Tuned end to end on
    # chairs the term is measured in benchmarks/RESULTS.md (session 17); the tiny VAE here is too noisy for that.
    import copy

    from nef_transformers.data.images import image_grid
    from nef_transformers.fields.siren import siren_forward
    from nef_transformers.tokenization.code import field_mmd, tune_decoder_to_prior

    model, _, weights = trained
    coords = image_grid(6, 6)
    code = torch.randn(1, model.num_tokens, model.chunk_width, generator=torch.Generator().manual_seed(6))
    training_fields = siren_forward(model.spec, weights, coords)

    def term(vae):
        with torch.no_grad():
            return float(field_mmd(siren_forward(model.spec, vae.decode(code.expand(40, -1, -1)), coords),
                                   training_fields))

    def stepped(mmd_weight):
        copied = copy.deepcopy(model)
        history = tune_decoder_to_prior(copied, weights, code, coords, epochs=1, cycle_weight=0.0, lr=3e-3,
                                        batch_size=40, seed=0, progress=False, mmd_weight=mmd_weight)
        return copied, history

    before = term(model)
    realistic, history = stepped(100.0)
    plain, plain_history = stepped(0.0)
    assert history["mmd"] == [pytest.approx(before, rel=1e-4)]  # the term it stepped on is the one computed here
    assert plain_history["mmd"] == [0.0]
    # (3.65 before; 3.46 after the step with the term, 3.86 without it, on this machine)
    assert term(realistic) < before - 0.1 and term(realistic) < term(plain) - 0.2, \
        (before, term(realistic), term(plain))
    with torch.no_grad():
        assert torch.equal(realistic.encode(weights), model.encode(weights))  # the encoders did not move


def test_tuning_to_the_prior_refuses_bad_settings(trained):
    from nef_transformers.data.images import image_grid
    from nef_transformers.tokenization.code import tune_decoder_to_prior

    model, _, weights = trained
    codes, coords = torch.zeros(4, model.num_tokens, model.chunk_width), image_grid(6, 6)
    with pytest.raises(ValueError, match="do not fit this NefCodeVAE"):
        tune_decoder_to_prior(model, weights, torch.zeros(4, 3), coords, progress=False)
    with pytest.raises(ValueError, match="cycle_weight >= 0"):
        tune_decoder_to_prior(model, weights, codes, coords, cycle_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="mmd_weight >= 0"):
        tune_decoder_to_prior(model, weights, codes, coords, mmd_weight=-1.0, progress=False)
    with pytest.raises(ValueError, match="mmd_weight > 0 compares batches"):
        tune_decoder_to_prior(model, weights, codes, coords, mmd_weight=1.0, batch_size=1, progress=False)
    with pytest.raises(ValueError, match=r"coords must be \(n, 2\)"):
        tune_decoder_to_prior(model, weights, codes, torch.zeros(5, 3), progress=False)
    with pytest.raises(ValueError, match=r"points_per_step must be in \[1, 36\]"):
        tune_decoder_to_prior(model, weights, codes, coords, points_per_step=100, progress=False)
    with pytest.raises(ValueError):
        tune_decoder_to_prior(model, weights[:, :-1], codes, coords, progress=False)


def test_tuned_decoders_save_and_serve_the_pipeline(trained, tmp_path):
    import copy

    from transformers import pipeline

    from nef_transformers.data.images import image_grid
    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForWeightRegression
    from nef_transformers.pipelines.neural_field_generation import TASK
    from nef_transformers.tokenization.code import tune_decoder_to_prior

    model, _, weights = trained
    tuned = copy.deepcopy(model)
    prior = torch.randn(50, model.num_tokens, model.chunk_width, generator=torch.Generator().manual_seed(4))
    tune_decoder_to_prior(tuned, weights, prior, image_grid(6, 6), epochs=2, lr=1e-2, batch_size=8, progress=False)
    tuned.save_pretrained(tmp_path / "tuned")
    reloaded = NefCodeVAE.from_pretrained(tmp_path / "tuned")
    config = NefGPTConfig(chunk_dim=2, max_position_embeddings=4, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_mixtures=2, field_spec=SPEC.to_dict(), field_source=SOURCE)
    gpt = NefGPTForWeightRegression(config).eval()
    with torch.no_grad():
        codes = gpt.sample(3, seed=2)
        assert torch.equal(reloaded.decode(codes), tuned.decode(codes))  # the file holds the tuned decoders
        assert not torch.allclose(reloaded.decode(codes), model.decode(codes))
    # NefGPT's samples through the tuned decoders: the same model, the tuned VAE as its tokenizer
    sampled = pipeline(TASK, model=gpt, tokenizer=reloaded)(num_samples=3, seed=2, output_type="weights")
    with torch.no_grad():
        assert torch.equal(torch.stack([s["weights"] for s in sampled]), reloaded.decode(codes))
