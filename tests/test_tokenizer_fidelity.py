"""benchmarks/tokenizer_fidelity.py: the rate-distortion arithmetic behind its two bounds."""

import math
from types import SimpleNamespace

import pytest
import torch


def test_water_filling_matches_the_closed_forms(benchmark_script):
    bench = benchmark_script("tokenizer_fidelity")
    # equal variances 1, summed error 0.4: the level is 0.1 on each of 4 directions, ½·log2(10) bits each
    bits, error = bench.water_fill(torch.ones(4), distortion=0.4)
    assert bits == pytest.approx(4 * 0.5 * math.log2(10), rel=1e-6) and error == pytest.approx(0.4, rel=1e-6)
    # variances 4 and 1 at level 1: one bit for the first, the second left uncoded (error 1 + 1)
    assert bench.water_fill(torch.tensor([4.0, 1.0]), distortion=2.0)[0] == pytest.approx(1.0, abs=1e-6)
    assert bench.water_fill(torch.tensor([4.0, 1.0]), bits=1.0)[1] == pytest.approx(2.0, rel=1e-6)
    # a level far below the smallest variance is reached: 0.01 summed error on variances >= 1 codes all of them
    bits, error = bench.water_fill(torch.tensor([9.0, 4.0, 1.0]), distortion=0.03)
    assert bits == pytest.approx(0.5 * (math.log2(900) + math.log2(400) + math.log2(100)), rel=1e-6)


def test_water_filling_round_trips_and_refuses_an_unclear_target(benchmark_script):
    bench = benchmark_script("tokenizer_fidelity")
    power = torch.rand(50, generator=torch.Generator().manual_seed(0)) ** 4
    for target in (1e-3, 0.05, 1.0):
        bits, error = bench.water_fill(power, distortion=target)
        assert error == pytest.approx(target, rel=1e-6)
        assert bench.water_fill(power, bits=bits)[1] == pytest.approx(target, rel=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        bench.water_fill(power)
    with pytest.raises(ValueError, match="exactly one"):
        bench.water_fill(power, distortion=1.0, bits=3.0)


def test_fixed_code_bound_pays_one_bit_per_direction_when_the_spread_doubles(benchmark_script):
    from nef_transformers.fields import SirenSpec, siren_init

    bench = benchmark_script("tokenizer_fidelity")
    spec = SirenSpec(in_dim=2, out_dim=1, hidden_dim=3, num_layers=2)  # 9 + 4 = 13 weights
    generator = torch.Generator().manual_seed(0)
    init = siren_init(spec, 1, generator=generator)
    residuals = torch.randn(400, init.shape[1], generator=generator) * 0.01
    grid = torch.linspace(-1, 1, 8)
    source = SimpleNamespace(coords=lambda: torch.cartesian_prod(grid, grid), std=(0.5,))
    # 80 dB: a tiny error budget, every one of the 13 directions is coded in both cases
    narrow = bench.fixed_code_bound(spec, init + residuals, residuals, [80.0], source, num_fields=5)
    wide = bench.fixed_code_bound(spec, init + residuals, 2 * residuals, [80.0], source, num_fields=5)
    assert wide - narrow == pytest.approx(13.0, rel=1e-6)
    # a looser error budget needs fewer bits
    assert bench.fixed_code_bound(spec, init + residuals, residuals, [40.0], source, num_fields=5) < narrow
