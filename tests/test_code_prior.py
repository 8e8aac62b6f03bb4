"""benchmarks/code_prior.py: the decoder's metric against autograd, and the code draws."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "code_prior.py"


def load_script():
    spec = importlib.util.spec_from_file_location("code_prior", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_autoencoder():
    from nef_transformers.fields.spec import SirenSpec
    from nef_transformers.tokenization.learned import NefAutoencoder, NefAutoencoderConfig

    spec = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)
    torch.manual_seed(0)
    autoencoder = NefAutoencoder(NefAutoencoderConfig(spec=spec.to_dict(), latent_dim=2, hidden_size=8, num_heads=2),
                                 torch.randn(spec.num_params) * 0.1).eval().double()
    return spec, autoencoder


def test_decoder_metric_is_the_mean_of_the_exact_jacobians_gram_matrices():
    from nef_transformers.data.images import image_grid
    from nef_transformers.fields.siren import siren_forward

    code_prior = load_script()
    spec, autoencoder = tiny_autoencoder()
    latents = torch.randn(5, autoencoder.num_tokens, 2, dtype=torch.float64)
    metric = code_prior.decoder_metric(autoencoder, spec, "image", latents, items=3, step=1e-4)
    chosen = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:3]
    grid = image_grid(14, 14).double()

    def outputs(flat):
        return siren_forward(spec, autoencoder.decode(flat.view(1, *latents.shape[1:])), grid).flatten()

    expected = sum(torch.autograd.functional.jacobian(outputs, latents[i].flatten()).T
                   @ torch.autograd.functional.jacobian(outputs, latents[i].flatten()) for i in chosen) / 3
    assert metric.shape == (latents[0].numel(),) * 2
    assert torch.allclose(metric, metric.T)
    # central differences of step 1e-4 against autograd: agree to 0.2 % of the largest entry
    assert torch.allclose(metric, expected, rtol=1e-2, atol=2e-3 * float(expected.abs().max()))
    # a different choice of fields gives a different metric: the seed picks which fields
    assert not torch.allclose(metric, code_prior.decoder_metric(autoencoder, spec, "image", latents, items=3, step=1e-4,
                                                                seed=1))


def test_codes_come_from_the_mixture_fitted_to_the_training_codes():
    code_prior = load_script()

    class Encoder(torch.nn.Sequential):  # codes = the inputs, posterior spread 0: the training codes are y itself
        def __init__(self):
            super().__init__(torch.nn.Linear(2, 4))

        def forward(self, y):
            return torch.cat([y, torch.full_like(y, -60.0)], -1)

    generator = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(100, 2, generator=generator) * 0.1 + 10, torch.randn(100, 2, generator=generator) * 0.1 - 10])
    codes = code_prior.draw_codes(Encoder(), y, 50, components=2, temperature=1.0, seed=0)
    assert codes.shape == (50, 2)
    near_a, near_b = (codes - 10).norm(dim=1) < 1, (codes + 10).norm(dim=1) < 1
    assert bool((near_a | near_b).all()) and near_a.any() and near_b.any()  # both clusters, nothing in between
    # temperature 0: every code is its component's mean; the same seed draws the same codes
    centres = code_prior.draw_codes(Encoder(), y, 50, components=2, temperature=0.0, seed=0)
    assert torch.allclose(centres.abs(), torch.full_like(centres, 10.0), atol=0.05)
    assert torch.equal(codes, code_prior.draw_codes(Encoder(), y, 50, components=2, temperature=1.0, seed=0))
    # no mixture: N(0, T² I), seeded
    normal = code_prior.draw_codes(Encoder(), y, 4000, components=0, temperature=2.0, seed=3)
    assert abs(float(normal.std()) - 2.0) < 0.1 and torch.equal(normal, code_prior.draw_codes(
        Encoder(), y, 4000, components=0, temperature=2.0, seed=3))
