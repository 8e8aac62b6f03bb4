"""benchmarks/code_prior.py: the code draws (the decoder's metric is tested with the package, in
test_tokenization_code.py)."""

import torch


def test_codes_come_from_the_mixture_fitted_to_the_training_codes(benchmark_script):
    code_prior = benchmark_script("code_prior")

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
