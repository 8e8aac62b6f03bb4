"""The main job (`nef-transformers quickstart`) and the experiment stages behind it: splits, output-folder
checks, baselines, and tiny end-to-end runs on images and voxel shapes (re-run reuses the stages)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from nef_transformers.experiment import (
    RunMismatchError,
    check_output_folder,
    gaussian_weights,
    latent_gaussian_weights,
    metrics_table,
    noisy_weights,
    split_indices,
)

TINY = ["--fit-steps", "5", "--epochs", "1", "--max-train-steps", "3", "--hidden-size", "16", "--num-layers", "1",
        "--top-k", "3"]


def test_split_is_seeded_disjoint_and_complete():
    train, test = split_indices(100, 0.2, seed=3)
    again_train, again_test = split_indices(100, 0.2, seed=3)
    other_train, _ = split_indices(100, 0.2, seed=4)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not np.array_equal(train, other_train)
    assert len(test) == 20 and len(train) == 80
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(100))
    sub_train, sub_test = split_indices(100, 0.2, seed=3, subset=10)
    assert len(sub_train) + len(sub_test) == 10 and set(sub_train).isdisjoint(sub_test)
    with pytest.raises(ValueError, match="more than the source has"):
        split_indices(5, 0.2, seed=0, subset=6)


def test_output_folder_refuses_other_runs_and_unwritable_paths(tmp_path):
    identity = {"source": "mnist", "num_items": 10}
    assert check_output_folder(tmp_path / "run", identity) == "new"
    assert check_output_folder(tmp_path / "run", identity) == "resumed"
    with pytest.raises(RunMismatchError, match=r"num_items: folder has 10, now 20.*--fresh"):
        check_output_folder(tmp_path / "run", {"source": "mnist", "num_items": 20})
    (tmp_path / "run" / "leftover").write_text("x")
    assert check_output_folder(tmp_path / "run", {"source": "mnist", "num_items": 20}, fresh=True) == "restarted"
    assert not (tmp_path / "run" / "leftover").exists()
    marker = tmp_path / "run" / "run.json"
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps({**saved, "version": "0.0.1"}))
    with pytest.raises(RunMismatchError, match=r"written by nef_transformers 0.0.1, this is .*--fresh"):
        check_output_folder(tmp_path / "run", {"source": "mnist", "num_items": 20})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="not empty and holds no run.json"):
        check_output_folder(tmp_path / "other", identity)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError):
        check_output_folder(tmp_path / "a_file" / "run", identity)


def test_output_folder_refuses_a_full_disk_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"only 1 MiB free on the disk of .*needs at least 256 MiB"):
        check_output_folder(tmp_path / "run", {"source": "mnist"})
    assert not (tmp_path / "run" / "run.json").exists()


def test_gaussian_baseline_matches_training_moments():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 4, generator=generator)
    train = torch.randn(4000, 4, generator=generator) @ mixing + torch.tensor([1.0, -2.0, 0.5, 3.0])
    draws = gaussian_weights(train, 20000, seed=1)
    assert torch.allclose(draws.mean(0), train.mean(0), atol=0.08)
    assert torch.allclose(torch.cov(draws.T), torch.cov(train.T), rtol=0.1, atol=0.1)
    assert torch.equal(draws[:5], gaussian_weights(train, 20000, seed=1)[:5])


def test_latent_gaussian_baseline_decodes_the_latents_mean_and_is_seeded():
    from nef_transformers.fields.spec import SirenSpec
    from nef_transformers.tokenization.learned import NefAutoencoder, NefAutoencoderConfig

    spec = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)
    torch.manual_seed(0)
    autoencoder = NefAutoencoder(NefAutoencoderConfig(spec=spec.to_dict(), latent_dim=4, hidden_size=8, num_heads=2),
                                 torch.randn(spec.num_params) * 0.1).eval()
    field = torch.randn(1, spec.num_params) * 0.1
    # one field repeated: the fitted Gaussian has no spread, every draw is that field's latents, decoded
    draws = latent_gaussian_weights(autoencoder, field.repeat(6, 1), 5, seed=0, batch_size=4)
    with torch.no_grad():
        expected = autoencoder.decode(autoencoder.encode(field))
    assert draws.shape == (5, spec.num_params) and draws.dtype == torch.float32
    assert torch.allclose(draws, expected.expand(5, -1), atol=1e-6)
    # distinct fields: distinct draws, the same ones for the same seed, whatever the batch size
    train = torch.randn(40, spec.num_params) * 0.1
    first = latent_gaussian_weights(autoencoder, train, 7, seed=3)
    assert torch.allclose(first, latent_gaussian_weights(autoencoder, train, 7, seed=3, batch_size=5), atol=1e-6)
    assert not torch.allclose(first, latent_gaussian_weights(autoencoder, train, 7, seed=4))
    assert torch.cdist(first, first).fill_diagonal_(1.0).min() > 1e-4


def test_nearest_distances_match_brute_force_in_blocks():
    from nef_transformers.experiment import nearest_distances

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    brute = ((a[:, None] - b[None]) ** 2).sum(-1).sqrt()
    assert np.allclose(nearest_distances(a, b, block=3), brute.min(1).values.numpy())
    among = ((a[:, None] - a[None]) ** 2).sum(-1).sqrt().fill_diagonal_(float("inf"))
    assert np.allclose(nearest_distances(a, a, exclude_self=True, block=4), among.min(1).values.numpy())


def test_reconstruction_scores_match_brute_force():
    from nef_transformers.experiment import PSNR_CAP_DB, nearest_scores, paired_scores

    rng = np.random.default_rng(0)
    a, b = torch.as_tensor(rng.random((5, 30)) > 0.5), torch.as_tensor(rng.random((7, 30)) > 0.6)

    def iou(x, y):
        x, y = x.numpy(), y.numpy()
        union = (x | y).sum()
        return 1.0 if union == 0 else (x & y).sum() / union

    assert np.allclose(paired_scores("occupancy", a, b[:5]), [iou(x, y) for x, y in zip(a, b[:5])])
    assert np.allclose(nearest_scores("occupancy", a, b, block=2), [max(iou(x, y) for y in b) for x in a])
    assert np.allclose(paired_scores("occupancy", a, a), 1.0)
    empty = torch.zeros(2, 30, dtype=torch.bool)
    assert np.allclose(paired_scores("occupancy", empty, empty), 1.0)  # two empty shapes agree
    assert np.allclose(nearest_scores("occupancy", empty, torch.cat([a, empty]), block=1), 1.0)
    x = torch.as_tensor(rng.random((4, 12)), dtype=torch.float32)
    y = torch.as_tensor(rng.random((6, 12)), dtype=torch.float32)

    def psnr(p, q):
        return 10 * np.log10(1 / np.mean((p.numpy().astype(np.float64) - q.numpy()) ** 2))

    assert np.allclose(paired_scores("image", x, y[:4]), [psnr(p, q) for p, q in zip(x, y[:4])], atol=1e-4)
    assert np.allclose(nearest_scores("image", x, y, block=3), [max(psnr(p, q) for q in y) for p in x], atol=1e-4)
    assert np.allclose(paired_scores("image", x, x), PSNR_CAP_DB)  # identical renderings: the cap, not inf
    assert np.allclose(nearest_scores("image", x, torch.cat([y, x])), PSNR_CAP_DB)  # each query finds itself
    with pytest.raises(ValueError, match="one shape"):
        paired_scores("image", x, y)
    with pytest.raises(ValueError, match="non-empty pool"):
        nearest_scores("image", x, y[:0])


def test_noisy_baseline_adds_scaled_noise_to_training_rows():
    train = torch.randn(500, 3) * torch.tensor([1.0, 10.0, 0.1])
    noisy = noisy_weights(train, 500, scale=0.5, seed=0)
    rows = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:500]
    noise = noisy - train[rows]
    ratio = noise.std(0) / train.std(0)
    assert torch.allclose(ratio, torch.full((3,), 0.5), rtol=0.15)


def test_metrics_table_shows_missing_values_as_dashes():
    row = {"strategy": "gaussian", "num_samples": 10, "invalid": 2, "mmd": 0.5, "cov": 0.25, "one_nna": None}
    table = metrics_table([row])
    assert "| gaussian | – | – | 2/10 | 0.5 | 25.0% | – | – |" in table
    # the two halves of the 1-NNA side by side: samples / references
    row.update(one_nna=0.67, one_nna_samples=0.36, one_nna_references=0.98)
    assert "| 67.0% | 36% / 98% |" in metrics_table([row])
    # a sampling seed other than the default is named beside the generator, so per-seed rows stay apart
    rows = [{**row, "strategy": "code", "seed": 0}, {**row, "strategy": "code", "seed": 2}]
    table = metrics_table(rows)
    assert "| code | – |" in table and "| code (seed 2) | – |" in table


def test_seed_means_average_each_setting_over_its_draws():
    from nef_transformers.experiment import seed_means

    def row(strategy, top_k, seed, one_nna, cov, fd=0.5):
        return {"strategy": strategy, "top_k": top_k, "temperature": 1.0, "seed": seed, "num_samples": 10,
                "invalid": seed % 2, "one_nna": one_nna, "cov": cov, "mmd": 0.1, "fd": fd,
                "one_nna_samples": 0.5, "one_nna_references": 0.9}

    rows = [row("code", 8, 0, 0.70, 0.40), row("code", 8, 1, 0.74, 0.50), row("code", 8, 2, 0.66, 0.45),
            row("code", 5, 0, 0.80, 0.30),  # one draw only: no mean
            row("code", 5, 1, 0.60, 0.30, fd=None),  # with the draw above: fd missing from one row
            {"strategy": "oracle-train", "num_samples": 10, "invalid": 0, "one_nna": 0.55, "cov": 0.5}]
    means = seed_means(rows)
    assert [(m["top_k"], m["seeds"]) for m in means] == [(8, [0, 1, 2]), (5, [0, 1])]
    eight, five = means
    assert eight["one_nna"] == pytest.approx(0.70) and eight["cov"] == pytest.approx(0.45)
    assert eight["invalid"] == 1 and eight["num_samples"] == 30 and eight["seed"] is None
    # the draws 0.70, 0.74, 0.66 spread by 0.04 (sample std); the mean's standard error is 0.04 / sqrt(3)
    assert eight["one_nna_sd"] == pytest.approx(0.04) and eight["one_nna_se"] == pytest.approx(0.04 / 3 ** 0.5)
    assert eight["one_nna_references"] == pytest.approx(0.9)
    assert five["fd"] is None and five["one_nna"] == pytest.approx(0.70)
    # settings the draws share travel with the mean; per-draw values that differ do not
    assert eight["temperature"] == 1.0 and "one_nna_samples" in eight
    assert seed_means([{**r, "components": 8, "sample_s": r["seed"]} for r in rows[:3]])[0]["components"] == 8
    assert "sample_s" not in seed_means([{**r, "sample_s": r["seed"]} for r in rows[:3]])[0]
    table = metrics_table(rows + means)
    assert "| code, mean of 3 seeds | 8 | 1.0 | 1/30 |" in table and "| 70.0% ± 2.3% |" in table
    assert seed_means(rows[:1] + rows[-1:]) == []


def test_samples_figure_shows_the_best_setting_by_its_mean_and_its_first_draw():
    from nef_transformers.experiment import figure_row

    def row(temperature, seed, one_nna):
        return {"strategy": "code", "top_k": 8, "temperature": temperature, "seed": seed, "one_nna": one_nna}

    # T 1.0 holds the best single draw (0.60) but the worse mean (0.70); T 1.3's mean is 0.69
    rows = [row(1.0, 0, 0.80), row(1.0, 1, 0.60), row(1.3, 5, 0.72), row(1.3, 6, 0.66),
            row(1.6, 0, None)]  # a draw that rendered nothing: no 1-NNA, left out
    assert figure_row(rows) == row(1.3, 5, 0.72), "T 1.3 by its first draw, not its best one"
    assert figure_row(rows[::-1])["seed"] == 6, "the first draw as the rows list them"
    assert figure_row([row(1.0, 0, 0.75), row(1.3, 0, 0.70)]) == row(1.3, 0, 0.70), "single draws: the best one"
    assert figure_row(rows[-1:]) is None and figure_row([]) is None


def _read_metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.timeout(600)
def test_quickstart_on_mnist_end_to_end_then_reuses_stages(tmp_path):
    from nef_transformers.cli import main
    from nef_transformers.pipelines.neural_field_generation import load_generation_folder

    out = tmp_path / "qs"
    assert main(["quickstart", "--num-items", "40", "--out", str(out), *TINY]) == 0
    for name in ("samples.png", "metrics.md", "metrics.json", "loss_curves.png", "model/config.json",
                 "model/model.safetensors"):
        assert (out / name).is_file(), name
    summary = _read_metrics(out)
    names = [row["strategy"] for row in summary["rows"]]
    assert names == ["nef_gpt-learned", "oracle-train", "noisy-train", "gaussian"]
    for row in summary["rows"]:
        assert row["num_samples"] == 8  # 40 items, 20 % held out
        if row["cov"] is not None:
            assert 0 <= row["cov"] <= 1 and 0 <= row["one_nna"] <= 1
    oracle = summary["rows"][1]
    assert oracle["invalid"] == 0 and oracle["mmd"] is not None
    # the generator's latents (as sampled) against the training fields' latents; weight-space rows have none
    ratios = {row["strategy"]: row["latent_nn_ratio"] for row in summary["rows"]}
    assert ratios["nef_gpt-learned"] > 0.05 and ratios["oracle-train"] is None and ratios["gaussian"] is None
    model, tokenization = load_generation_folder(out / "model")
    assert model.config.field_source["kind"] == "image"
    shards = sorted((out / "fields" / "shards").iterdir())
    stamps = [p.stat().st_mtime_ns for p in shards]
    model_stamp = (out / "learned" / "model" / "model.safetensors").stat().st_mtime_ns

    # an interrupted earlier attempt: a half-written tokenization and a half-written samples file are left behind,
    # and the finished samples are gone; the re-run ignores the leftovers and samples the same fields again
    (out / "learned" / "tokenization.tmp").mkdir()
    (out / "learned" / "tokenization.tmp" / "partial.arrow").write_bytes(b"\0" * 10)
    (samples_file,) = (out / "learned" / "samples").glob("*.safetensors")
    samples_file.with_name(samples_file.name + ".tmp").write_bytes(b"truncated")
    samples_file.unlink()
    assert main(["quickstart", "--num-items", "40", "--out", str(out), *TINY]) == 0
    assert samples_file.is_file()
    assert [p.stat().st_mtime_ns for p in sorted((out / "fields" / "shards").iterdir())] == stamps
    assert (out / "learned" / "model" / "model.safetensors").stat().st_mtime_ns == model_stamp
    assert _read_metrics(out)["rows"][0]["mmd"] == summary["rows"][0]["mmd"]  # same cached samples

    # another split in the same folder is refused, with the way out named
    assert main(["quickstart", "--num-items", "30", "--out", str(out), *TINY]) == 1

    # the same split with another autoencoder or another NefGPT size: the cached stages are not silently reused
    from nef_transformers.experiment import Run, RunConfig

    same = dict(source="mnist", num_items=40, fit_steps=5, strategy="learned", hidden_size=16, num_hidden_layers=1,
                num_attention_heads=4, num_train_epochs=1, max_train_steps=3, autoencoder_epochs=1)
    with pytest.raises(RunMismatchError, match="hidden_size: 64 there, 96 asked"):
        Run(out, RunConfig(**same, autoencoder_hidden_size=96), device="cpu", progress=False).tokenize()
    with pytest.raises(RunMismatchError, match="hidden_size: 16 there, 32 asked"):
        Run(out, RunConfig(**{**same, "hidden_size": 32}), device="cpu", progress=False).train()
    with pytest.raises(RunMismatchError, match="hidden_dropout: 0.0 there, 0.1 asked"):
        Run(out, RunConfig(**same, dropout=0.1), device="cpu", progress=False).train()
    with pytest.raises(RunMismatchError, match="num_mixtures: 8 there, 64 asked"):  # a head of another size
        Run(out, RunConfig(**same, num_mixtures=64), device="cpu", progress=False).train()
    with pytest.raises(RunMismatchError, match="chunk_noise: 0.0 there, 0.3 asked"):
        Run(out, RunConfig(**same, chunk_noise=0.3), device="cpu", progress=False).train()
    with pytest.raises(RunMismatchError, match="latent_noise: 0.0 there, 0.3 asked"):
        Run(out, RunConfig(**same, autoencoder_latent_noise=0.3), device="cpu", progress=False).tokenize()
    # the quickstart's autoencoder reads the fields (the default encoder); the neuron encoder is another stage
    with pytest.raises(RunMismatchError, match="encoder: 'function' there, 'weights' asked"):
        Run(out, RunConfig(**same, autoencoder_encoder="weights"), device="cpu", progress=False).tokenize()
    # the autoencoder ceiling row: the oracle's training fields through the autoencoder, scored like the others
    run = Run(out, RunConfig(**same), device="cpu", progress=False)
    row = run.autoencoder_row()
    assert row["strategy"] == "autoencoder-train" and row["num_samples"] == 8 and row["mmd"] is not None
    assert row["mmd"] != oracle["mmd"]  # decoded fields differ from the training fields themselves
    # the trivial prior over the same latents: one Gaussian, decoded, as many samples as test items
    gaussian = run.latent_gaussian_row()
    assert gaussian["strategy"] == "gaussian-latent" and gaussian["num_samples"] == 8
    assert gaussian["mmd"] is not None and gaussian["mmd"] != row["mmd"]
    # in latent space the ceiling is the training set itself, the Gaussian is not
    assert row["latent_nn_ratio"] < 1e-4 and gaussian["latent_nn_ratio"] > 0.3
    # jittered copies: without noise they are the ceiling's fields exactly (same seeded rows, encode -> decode)
    copies = run.latent_noisy_row(noise_scale=0.0)
    assert copies["strategy"] == "noisy-latent" and copies["noise_scale"] == 0.0
    assert copies["mmd"] == pytest.approx(row["mmd"], rel=1e-5) and copies["one_nna"] == row["one_nna"]
    jittered = run.latent_noisy_row(noise_scale=0.3)
    assert jittered["num_samples"] == 8 and jittered["mmd"] != row["mmd"]
    assert copies["latent_nn_ratio"] < 1e-4 < jittered["latent_nn_ratio"] < gaussian["latent_nn_ratio"]
    with pytest.raises(ValueError, match="latents hold 3 values per field, the autoencoder's"):
        run.latent_nn_ratio(torch.zeros(2, 3))
    train_latents = run._training_latents()
    broken = torch.cat([train_latents[:3], torch.full_like(train_latents[:1], float("nan"))])
    assert run.latent_nn_ratio(broken) == run.latent_nn_ratio(train_latents[:3]) < 1e-4  # NaN samples left out
    assert run.latent_nn_ratio(broken[3:]) is None
    # a samples file from before the sequences were kept: sampled again (same seed, same weights), then kept
    from safetensors.torch import load_file, save_file

    (samples_file,) = (out / "learned" / "samples").glob("*.safetensors")
    top_k, temperature, num, seed = (part[1:] for part in samples_file.stem.split("_"))  # k3_t0.5_n8_s0
    saved = load_file(samples_file)
    save_file({"weights": saved["weights"]}, str(samples_file))
    settings = dict(top_k=int(top_k), temperature=float(temperature), num_samples=int(num), seed=int(seed))
    assert torch.equal(run.sample(**settings), saved["weights"])  # weights only: the old file is enough
    weights, sequences = run.sample(**settings, return_sequences=True)
    assert torch.equal(weights, saved["weights"]) and torch.equal(sequences, saved["sequences"])
    assert set(load_file(samples_file)) == {"weights", "sequences"}
    # the code strategy: a VAE over the same autoencoder's latents, NefGPT over its codes, cached like the others
    code_settings = dict(same, strategy="code", code_steps=30, code_draws=2)
    code = Run(out, RunConfig(**code_settings), device="cpu", progress=False)
    code.train()
    code_info = json.loads((out / "code" / "tokenization" / "tokenize.json").read_text())
    assert code_info["rows_per_field"] == 2 and code_info["tokens_per_field"] == 8 and code_info["num_fields"] == 32
    weights, sequences = code.sample(top_k=3, temperature=1.0, return_sequences=True)
    vae = code.code_vae()
    assert sequences.shape == (8, 8, 4) and weights.shape == (8, vae.spec.num_params)
    latents = code.sequence_latents("code", sequences)
    with torch.no_grad():
        assert torch.allclose(vae.decode(sequences), weights, atol=1e-5)
        assert torch.allclose(vae.autoencoder.decode(latents), weights, atol=1e-5)
    assert code.sequence_latents("naive", sequences) is None
    ceiling, prior = code.code_rows()
    assert [ceiling["strategy"], prior["strategy"]] == ["code-train", "gaussian-code"]
    assert ceiling["num_samples"] == prior["num_samples"] == 8 and ceiling["mmd"] != prior["mmd"]
    # a mixture of Gaussians over the same training codes: seeded, decoded like NefGPT's codes
    mixture = code.code_mixture_row(seed=0, components=2)
    assert mixture["strategy"] == "mixture-code" and mixture["components"] == 2 and mixture["seed"] == 0
    assert mixture["num_samples"] == 8 and mixture["mmd"] not in (None, prior["mmd"], ceiling["mmd"])
    assert code.code_mixture_row(seed=0, components=2)["mmd"] == mixture["mmd"]
    assert code.code_mixture_row(seed=1, components=2)["mmd"] != mixture["mmd"]
    with pytest.raises(ValueError, match="needs >= 100 training codes, got 64"):
        code.code_mixture_row(components=100)
    with pytest.raises(ValueError, match="components must be an int >= 1, got 0"):
        code.code_mixture_row(components=0)
    # does the autoencoder generalise? The held-out items fitted alike (same shared init), only for this diagnostic
    from nef_transformers.data.metadata import get_shared_init

    learned_recon = run.reconstruction_row("learned")
    heldout = run.heldout_fields()
    assert len(heldout) == 8 and len(run.fit()) == 32
    assert torch.equal(get_shared_init(heldout), get_shared_init(run.fit()))
    assert learned_recon["strategy"] == "reconstruction-learned" and learned_recon["measure"] == "psnr_db"
    assert learned_recon["num_train"] == learned_recon["num_heldout"] == 8
    assert all(0 < learned_recon[k] < 100 for k in ("train", "heldout", "retrieval"))
    stamps = [p.stat().st_mtime_ns for p in sorted((out / "heldout_fields" / "shards").iterdir())]
    code_recon = code.reconstruction_row()
    assert code_recon["strategy"] == "reconstruction-code" and code_recon["retrieval"] == learned_recon["retrieval"]
    assert code_recon["train"] != learned_recon["train"]  # through the VAE's codes, not the latents
    assert [p.stat().st_mtime_ns for p in sorted((out / "heldout_fields" / "shards").iterdir())] == stamps  # reused
    # another VAE over the same codes (e.g. decoders tuned to the prior): measured through it, not the run's
    assert code.reconstruction_row(code_vae=code.code_vae()) == code_recon
    altered = code.code_vae()
    with torch.no_grad():
        for p in altered.decoder.parameters():
            p.mul_(0.5)
    assert code.reconstruction_row(code_vae=altered)["train"] != code_recon["train"]
    with pytest.raises(ValueError, match="code_vae is a code-strategy model"):
        run.reconstruction_row("learned", code_vae=altered)
    with pytest.raises(ValueError, match="'naive' reconstructs exactly"):
        run.reconstruction_row("naive")
    # held-out fields from another shared init would not be the same kind of field: refused, the way out named
    info_path = out / "heldout_fields" / "dataset" / "dataset_info.json"
    original = info_path.read_text()
    info = json.loads(original)
    description = json.loads(info["description"])
    description["nef_transformers"]["shared_init"][0] += 1.0
    info["description"] = json.dumps(description)
    info_path.write_text(json.dumps(info))
    with pytest.raises(RunMismatchError, match="another shared initialisation .* delete it to refit"):
        Run(out, RunConfig(**same), device="cpu", progress=False).heldout_fields()
    info_path.write_text(original)
    with pytest.raises(RunMismatchError, match="sigma2: 0.3 there, 0.5 asked"):
        Run(out, RunConfig(**code_settings, code_sigma2=0.5), device="cpu", progress=False).tokenize()
    with pytest.raises(RunMismatchError, match="autoencoder_hidden_size: 64 there, 96 asked"):
        Run(out, RunConfig(**{**code_settings, "autoencoder_hidden_size": 96}), device="cpu", progress=False).tokenize()
    with pytest.raises(RunMismatchError, match="autoencoder_encoder: 'function' there, 'weights' asked"):
        Run(out, RunConfig(**code_settings, autoencoder_encoder="weights"), device="cpu", progress=False).tokenize()
    # NefGPT's mixture covariance is one of its settings; models saved before the option had diagonal ones
    with pytest.raises(RunMismatchError, match="mixture_covariance: 'diagonal' there, 'full' asked"):
        Run(out, RunConfig(**code_settings, mixture_covariance="full"), device="cpu", progress=False).train()
    config_file = out / "code" / "model" / "config.json"
    saved_config = json.loads(config_file.read_text())
    assert saved_config.pop("mixture_covariance") == "diagonal"
    config_file.write_text(json.dumps(saved_config))
    assert code.train() == out / "code" / "model"
    shutil.rmtree(out / "code" / "model")
    full = Run(out, RunConfig(**code_settings, mixture_covariance="full"), device="cpu", progress=False)
    full.train()
    assert json.loads(config_file.read_text())["mixture_covariance"] == "full"
    full_weights, full_sequences = full.sample(top_k=3, temperature=1.0, return_sequences=True)
    assert full_sequences.shape == (8, 8, 4) and torch.isfinite(full_weights).all()
    # the samples cached for this setting were the diagonal model's: a model trained again draws them anew
    assert not torch.equal(full_sequences, sequences)
    with torch.no_grad():
        assert torch.allclose(vae.decode(full_sequences), full_weights, atol=1e-5)
    # decoders tuned to NefGPT's own draws: a generation folder of the same NefGPT with the tuned VAE as its
    # tokenizer; the encoders stay, only the decoders move; the pipeline samples the same codes through them
    from safetensors.torch import load_file as load_tensors, save_file as save_tensors
    from transformers import pipeline

    from nef_transformers.data.metadata import weights_tensor
    from nef_transformers.experiment import DecoderTuning, decode_codes
    from nef_transformers.pipelines.neural_field_generation import generate_weights
    from nef_transformers.tokenization.code import decoder_parameters

    tuning = DecoderTuning(prior_codes=12, epochs=2, batch_size=8, lr=1e-3)
    folder = full.tune_decoders(3, 1.0, tuning)
    assert folder == out / "code" / "tuned"
    saved = json.loads((folder / "tune.json").read_text())
    assert saved["settings"] == tuning.settings(3, 1.0) and saved["settings"]["mmd_weight"] == 1.0
    assert len(saved["history"]["reconstruction"]) == len(saved["history"]["mmd"]) == 2
    card = (folder / "README.md").read_text()
    assert card.startswith((out / "code" / "model" / "README.md").read_text().rstrip("\n"))  # NefGPT's card, then:
    assert "12 of NefGPT's own draws (top-k 3, temperature 1)" in card and "1 × the realism term" in card
    tuned_model, tuned = load_generation_folder(folder)
    untuned = full.code_vae()
    training = weights_tensor(full.fit())
    with torch.no_grad():  # the training fields' codes, on which NefGPT was trained, stay as they were
        assert torch.equal(tuned.encode(training), untuned.encode(training))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_parameters(tuned), decoder_parameters(untuned)))
    model, untuned_folder_vae = load_generation_folder(full.train())
    assert all(torch.equal(a, b) for a, b in zip(tuned_model.parameters(), model.parameters()))
    draw = dict(top_k=3, temperature=1.0, seed=0, progress=False, return_sequences=True)
    piped, piped_sequences = generate_weights(tuned_model, tuned, 8, **draw)
    plain, plain_sequences = generate_weights(model, untuned_folder_vae, 8, **draw)
    assert torch.equal(piped_sequences, plain_sequences)  # NefGPT's codes: unchanged by the tuning
    assert torch.equal(plain_sequences, full_sequences)  # and the cached samples are this model's draws
    through_tuned, _ = decode_codes(full.tuned_code_vae(folder), piped_sequences)
    assert torch.allclose(piped, through_tuned, atol=1e-5) and not torch.allclose(piped, plain, atol=1e-3)
    pipe = pipeline("neural-field-generation", model=str(folder))  # the folder as users load it
    fields = pipe(num_samples=8, top_k=3, temperature=1.0, seed=0, output_type="weights")
    assert torch.equal(torch.stack([field["weights"] for field in fields]), piped)
    stamp = (folder / "tune.json").stat().st_mtime_ns
    assert full.tune_decoders(3, 1.0, tuning) == folder and (folder / "tune.json").stat().st_mtime_ns == stamp
    with pytest.raises(RunMismatchError, match="mmd_weight: 1.0 there, 0.0 asked"):  # the cycle term alone
        full.tune_decoders(3, 1.0, DecoderTuning(prior_codes=12, epochs=2, batch_size=8, lr=1e-3, mmd_weight=0.0))
    with pytest.raises(RunMismatchError, match="temperature: 1.0 there, 1.3 asked"):
        full.tune_decoders(3, 1.3, tuning)
    # NefGPT trained again (here: its weights changed in place): decoders tuned to the old one's draws are refused
    model_file = out / "code" / "model" / "model.safetensors"
    original_model = model_file.read_bytes()
    save_tensors({k: v * 1.01 for k, v in load_tensors(model_file).items()}, str(model_file), metadata={"format": "pt"})
    with pytest.raises(RunMismatchError, match="tuned to the draws of another NefGPT"):
        full.tune_decoders(3, 1.0, tuning)
    model_file.write_bytes(original_model)
    assert full.tune_decoders(3, 1.0, tuning) == folder
    with pytest.raises(ValueError, match="prior_codes must be >= 1, got 0"):
        DecoderTuning(prior_codes=0)
    # the autoencoder's loss and batch are part of its settings; folders written before they were recorded meant
    # the MSE and 64 fields per step
    info_file = out / "learned" / "tokenization" / "tokenize.json"
    info = json.loads(info_file.read_text())
    assert info["settings"].pop("function_loss") == "mse"  # MNIST: pixel values, not occupancy logits
    assert info.pop("batch_size") == 64
    info_file.write_text(json.dumps(info))
    assert run.tokenize() == out / "learned" / "tokenization"
    info["settings"]["function_loss"] = "kl"
    info_file.write_text(json.dumps(info))
    with pytest.raises(RunMismatchError, match="function_loss: 'kl' there, 'mse' asked"):
        run.tokenize()


def test_run_config_refuses_bad_settings():
    from nef_transformers.experiment import RunConfig

    with pytest.raises(ValueError, match="strategy must be one of"):
        RunConfig(strategy="bpe")
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1"):
        RunConfig(test_fraction=1)
    for dropout in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got {dropout}"):
            RunConfig(dropout=dropout)
    with pytest.raises(ValueError, match="chunk_noise must be >= 0, got -1"):
        RunConfig(chunk_noise=-1)
    with pytest.raises(ValueError, match="mixture_covariance must be 'diagonal' or 'full', got 'tied'"):
        RunConfig(mixture_covariance="tied")
    with pytest.raises(ValueError, match=r"autoencoder_encoder must be one of \('weights', 'function'\), got 'cnn'"):
        RunConfig(autoencoder_encoder="cnn")
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"eval_steps must be an int >= 1, got {steps}"):
            RunConfig(eval_steps=steps)


def test_quickstart_and_tokenize_offer_every_encoder_and_default_to_the_function_encoder():
    import argparse

    from nef_transformers.cli import build_parser
    from nef_transformers.experiment import RunConfig
    from nef_transformers.quickstart import ENCODER_CHOICES, add_arguments
    from nef_transformers.tokenization.learned import ENCODERS, NefAutoencoderConfig

    assert ENCODER_CHOICES == ENCODERS
    quickstart = add_arguments(argparse.ArgumentParser())
    assert quickstart.parse_args([]).ae_encoder == RunConfig().autoencoder_encoder == "function"
    assert quickstart.parse_args(["--ae-encoder", "weights"]).ae_encoder == "weights"
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--ae-encoder", "cnn"])
    assert build_parser().parse_args(["tokenize", "--nefs", "data", "--out", "x"]).encoder == "function"
    # the config's own default stays the neuron encoder: autoencoder files written before the option load unchanged
    spec = {"in_dim": 2, "out_dim": 1, "hidden_dim": 8, "num_layers": 2}
    assert NefAutoencoderConfig(spec=spec).encoder == "weights"


def test_quickstart_with_tuned_decoders_writes_the_tuned_generator(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import pipeline

    from nef_transformers.cli import main
    from nef_transformers.experiment import decode_codes
    from nef_transformers.tokenization.code import NefCodeVAE

    out = tmp_path / "qs"
    assert main(["quickstart", "--num-items", "40", "--out", str(out), "--strategy", "learned", "--tune-decoders",
                 *TINY]) == 1
    assert "--tune-decoders tunes the code strategy's decoders: pass --strategy code (got learned)" in \
        capsys.readouterr().err
    assert main(["quickstart", "--num-items", "40", "--out", str(out), "--strategy", "code", "--tune-decoders",
                 *TINY]) == 0
    assert "[quickstart] 4/6 tune decoders ..." in capsys.readouterr().out
    summary = _read_metrics(out)
    assert summary["rows"][0]["strategy"] == "nef_gpt-code-tuned"
    assert "`nef-transformers quickstart --source mnist --out" in (out / "metrics.md").read_text()
    assert "--strategy code --tune-decoders`" in (out / "metrics.md").read_text()
    # OUT/model is the tuned generator: the pipeline samples NefGPT's codes through the tuned decoders, and those
    # are the fields the quickstart scored
    assert (out / "model" / "tune.json").is_file()
    tuned = NefCodeVAE.from_pretrained(out / "model" / "tokenizer")
    (samples_file,) = (out / "code" / "samples").glob("*.safetensors")
    scored, _ = decode_codes(tuned, load_file(samples_file)["sequences"])
    fields = pipeline("neural-field-generation", model=str(out / "model"))(num_samples=8, top_k=3, temperature=0.8,
                                                                           seed=0, output_type="weights")
    assert torch.allclose(torch.stack([field["weights"] for field in fields]), scored, atol=1e-5)
    untuned, _ = decode_codes(NefCodeVAE.from_pretrained(out / "code" / "model" / "tokenizer"),
                              load_file(samples_file)["sequences"])
    assert not torch.allclose(untuned, scored, atol=1e-3)


@pytest.mark.timeout(600)
def test_quickstart_on_voxel_shapes_writes_meshes(tmp_path):
    from nef_transformers.cli import main

    # ten solid boxes of different sizes on a 16^3 grid
    voxels = np.zeros((10, 16, 16, 16), dtype=bool)
    for i in range(10):
        half = 3 + i % 4
        voxels[i, 8 - half:8 + half, 8 - half + 1:8 + half - 1, 8 - half:8 + half] = True
    source = tmp_path / "boxes.npz"
    np.savez(source, voxels=voxels)
    out = tmp_path / "shapes"
    assert main(["quickstart", "--source", str(source), "--out", str(out), "--fit-steps", "40", "--epochs", "1",
                 "--max-train-steps", "2", "--hidden-size", "16", "--num-layers", "1"]) == 0
    summary = _read_metrics(out)
    assert (out / "samples.png").is_file() and (out / "metrics.md").is_file()
    oracle = next(row for row in summary["rows"] if row["strategy"] == "oracle-train")
    assert oracle["invalid"] == 0 and oracle["mmd"] is not None  # fitted boxes render as surfaces
    generated = summary["rows"][0]
    written = list((out / "meshes").glob("*.ply"))
    assert generated["num_samples"] == 2  # 10 shapes, 20 % held out
    assert len(written) == generated["num_samples"] - generated["invalid"]  # empty shapes counted, not written
