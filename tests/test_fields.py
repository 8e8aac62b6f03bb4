"""SirenSpec layout, batched SIREN, initialisation, hand-written gradients, fitting and rendering."""

import math

import numpy as np
import pytest
import torch

from nef_transformers.fields import (
    FitConfig, FitDivergenceError, SirenSpec, extract_mesh, fit_batch, occupancy_iou, psnr_fit_a_nef,
    render_images, render_meshes, siren_forward, siren_init,
)
from nef_transformers.fields.fit import StackedSiren, _loss_and_grad
from nef_transformers.fields.siren import positional_encoding


# --------------------------------------------------------------------------------------------- SirenSpec
def test_num_params_counted_by_hand():
    # 2->32->32->1: (2*32 + 32) + (32*32 + 32) + (32*1 + 1)
    assert SirenSpec().num_params == 96 + 1056 + 33
    # HyperDiffusion's MLP: 27->128->128->128->1 = 36,737 weights (ANCHORS.md)
    assert SirenSpec(in_dim=3, hidden_dim=128, num_layers=4, activation="relu", num_frequencies=4).num_params == 36737


def test_param_shapes_order_is_weight_then_bias_per_layer():
    spec = SirenSpec(in_dim=3, out_dim=2, hidden_dim=5, num_layers=3)
    assert list(spec.param_shapes.items()) == [
        ("layers.0.weight", (5, 3)), ("layers.0.bias", (5,)),
        ("layers.1.weight", (5, 5)), ("layers.1.bias", (5,)),
        ("layers.2.weight", (2, 5)), ("layers.2.bias", (2,)),
    ]


def test_json_round_trip():
    spec = SirenSpec(in_dim=3, out_dim=1, hidden_dim=64, num_layers=4, omega_0=15)
    assert SirenSpec.from_json(spec.to_json()) == spec


def test_flatten_unflatten_round_trip_is_exact():
    spec = SirenSpec(hidden_dim=7)
    weights = torch.randn(4, spec.num_params)
    assert torch.equal(spec.flatten(spec.unflatten(weights)), weights)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_dim": 0}, "hidden_dim"), ({"num_layers": 1}, "num_layers"), ({"omega_0": -1.0}, "omega_0"),
    ({"omega_0": float("nan")}, "omega_0"), ({"activation": "tanh"}, "activation"), ({"in_dim": 2.5}, "in_dim"),
])
def test_invalid_spec_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SirenSpec(**kwargs)


def test_wrong_weight_width_names_the_spec():
    with pytest.raises(ValueError, match="expected \\(b, 1185\\)"):
        SirenSpec().unflatten(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="unknown SirenSpec fields"):
        SirenSpec.from_dict({"in_dim": 2, "depth": 3})


# ------------------------------------------------------------------------------------------ SIREN forward
def _reference_siren(spec, flat, coords):
    """An independent nn.Linear implementation of one field."""
    layers = []
    start = 0
    for fan_in, fan_out in spec.layer_dims:
        linear = torch.nn.Linear(fan_in, fan_out).double()
        with torch.no_grad():
            linear.weight.copy_(flat[start:start + fan_in * fan_out].view(fan_out, fan_in))
            start += fan_in * fan_out
            linear.bias.copy_(flat[start:start + fan_out])
            start += fan_out
        layers.append(linear)
    hidden = coords
    for i, linear in enumerate(layers):
        hidden = linear(hidden)
        if i < len(layers) - 1:
            hidden = torch.sin(spec.omega_0 * hidden)
    return hidden


def test_batched_forward_matches_per_field_modules():
    spec = SirenSpec(in_dim=2, out_dim=3, hidden_dim=8, num_layers=4, omega_0=10.0)
    weights = torch.randn(3, spec.num_params, dtype=torch.float64) * 0.3
    coords = torch.rand(50, 2, dtype=torch.float64) * 2 - 1
    batched = siren_forward(spec, weights, coords)
    for i in range(3):
        assert torch.allclose(batched[i], _reference_siren(spec, weights[i], coords), atol=1e-12)


def test_per_field_coords_match_shared_coords():
    spec = SirenSpec(in_dim=3, hidden_dim=6)
    weights = torch.randn(2, spec.num_params)
    coords = torch.rand(20, 3) - 0.5
    assert torch.allclose(siren_forward(spec, weights, coords),
                          siren_forward(spec, weights, coords.expand(2, -1, -1)), atol=1e-6)


def test_init_ranges_follow_the_siren_formula():
    spec = SirenSpec(hidden_dim=64, omega_0=30.0)
    params = spec.unflatten(siren_init(spec, 1, generator=torch.Generator().manual_seed(0)))
    first, hidden, last = params["layers.0.weight"], params["layers.1.weight"], params["layers.2.weight"]
    assert first.abs().max() <= 1 / 2 and first.abs().max() > 0.9 / 2
    bound = math.sqrt(6 / 64) / 30
    assert hidden.abs().max() <= bound and hidden.abs().max() > 0.9 * bound
    assert abs(last.std().item() - 1 / math.sqrt(64)) < 0.05
    assert all(params[f"layers.{l}.bias"].abs().sum() == 0 for l in range(3))


def test_shared_init_repeats_one_draw_and_random_init_does_not():
    spec = SirenSpec(hidden_dim=8)
    shared = siren_init(spec, 4, shared=True, generator=torch.Generator().manual_seed(1))
    random = siren_init(spec, 4, shared=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(shared[0], shared[3])
    assert not torch.equal(random[0], random[3])


# ------------------------------------------------------------------------------------ gradients, fitting
@pytest.mark.parametrize("spec, task", [
    (SirenSpec(hidden_dim=6, num_layers=3), "image"),
    (SirenSpec(in_dim=3, hidden_dim=5, num_layers=4, omega_0=12.0), "occupancy"),
    (SirenSpec(in_dim=3, hidden_dim=5, num_layers=3, activation="relu", num_frequencies=2), "occupancy"),
])
def test_hand_written_gradients_equal_autograd(spec, task):
    generator = torch.Generator().manual_seed(0)
    weights = siren_init(spec, 3, shared=False, generator=generator).double()
    weights[:, -spec.out_dim:] += 0.1  # non-zero biases
    coords = torch.rand(3, 40, spec.in_dim, dtype=torch.float64, generator=generator) - 0.5
    targets = (torch.rand(3, 40, spec.out_dim, dtype=torch.float64, generator=generator) > 0.5).double()
    model = StackedSiren(spec, weights)
    outputs, saved = model.forward(positional_encoding(coords, spec.num_frequencies))
    _, grad_outputs = _loss_and_grad(task, outputs, targets)
    model.backward(grad_outputs, saved)
    mine = torch.cat([g.reshape(3, -1) for g in model.grads], dim=1)

    reference = weights.clone().requires_grad_()
    predictions = siren_forward(spec, reference, coords)
    if task == "image":
        loss = (predictions - targets).square().mean(dim=(1, 2)).sum()
    else:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(predictions, targets, reduction="none").mean(dim=(1, 2)).sum()
    loss.backward()
    assert torch.allclose(mine, reference.grad, atol=1e-10, rtol=1e-8)


def test_batched_fit_equals_per_field_fit():
    spec = SirenSpec(hidden_dim=8)
    init = siren_init(spec, 3, shared=True, generator=torch.Generator().manual_seed(0))
    coords = torch.rand(30, 2) * 2 - 1
    signals = torch.randn(3, 30, 1)
    config = FitConfig(steps=15)
    together, _ = fit_batch(spec, init, coords, signals, config)
    for i in range(3):
        alone, _ = fit_batch(spec, init[i:i + 1], coords, signals[i:i + 1], config)
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_divergence_names_the_fields():
    spec = SirenSpec(hidden_dim=4)
    init = siren_init(spec, 3)
    signals = torch.zeros(3, 10, 1)
    signals[1, 3] = float("nan")
    with pytest.raises(FitDivergenceError, match=r"fields 11\b") as error:
        fit_batch(spec, init, torch.rand(10, 2), signals, FitConfig(steps=10), field_ids=[10, 11, 12])
    assert error.value.fields == [11]


def test_fit_config_validates():
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=0)
    with pytest.raises(ValueError, match="init"):
        FitConfig(init="meta")


# ---------------------------------------------------------------------------------------------- quality
def test_psnr_matches_numpy_reference():
    rng = np.random.default_rng(0)
    target = rng.random((2, 20, 1))
    prediction = target + rng.normal(0, 0.05, target.shape)
    mean, std = 0.1307, 0.3081
    ours = psnr_fit_a_nef(torch.tensor((prediction - mean) / std), torch.tensor((target - mean) / std), [mean], [std])
    for i in range(2):
        peak = target[i].max()
        expected = -10 * np.log10(np.mean((prediction[i] / peak - target[i] / peak) ** 2))
        assert abs(ours[i].item() - expected) < 1e-6


def test_iou_known_cases():
    truth = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 4, 1)
    assert occupancy_iou(torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 4, 1), truth).item() == 1.0
    assert occupancy_iou(torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1), truth).item() == pytest.approx(1 / 3)
    assert occupancy_iou(-torch.ones(1, 4, 1), torch.zeros(1, 4, 1)).item() == 1.0  # empty and empty


# -------------------------------------------------------------------------------------------- rendering
def test_rendered_image_reproduces_the_fitted_psnr():
    from nef_transformers.data.images import load_mnist
    from nef_transformers.fields import fit_neural_fields

    source = load_mnist()
    result = fit_neural_fields(source, SirenSpec(), FitConfig(steps=60), indices=[0, 700], progress=False)
    assert result.psnr.min() > 25.0  # the default config fits digits well
    assert result.loss_curve[-1] < result.loss_curve[0] / 20
    images = render_images(SirenSpec(), result.weights, (28, 28, 1), source.mean, source.std)
    truth = source.images[[0, 700], ..., 0].astype(np.float64) / 255.0
    for i in range(2):
        peak = truth[i].max()
        psnr = -10 * np.log10(np.mean((images[i, ..., 0] / peak - truth[i] / peak) ** 2))
        assert psnr > result.psnr[i].item() - 0.5  # clipping to [0, 1] can only help


def test_marching_cubes_of_a_sphere_and_of_an_empty_field():
    axis = torch.linspace(-0.5, 0.5, 33)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    mesh = extract_mesh(0.3 - grid.norm(dim=-1))
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - 0.3) < 0.01 and radii.std() < 0.01
    spec = SirenSpec(in_dim=3, hidden_dim=4)
    empty = torch.zeros(1, spec.num_params)
    empty[0, -1] = -5.0  # output bias: every point outside
    assert render_meshes(spec, empty, resolution=16) == [None]


def test_preview_grid_puts_each_fitted_image_beside_its_real_one():
    from nef_transformers.fields.preview import image_pairs_grid

    rng = np.random.default_rng(0)
    real, fitted = rng.random((3, 4, 5, 1)), rng.random((3, 4, 5, 1))
    grid = image_pairs_grid(real, fitted, columns=2)
    assert grid.shape == (2 * 5 + 1, 2 * 12 + 1, 1) and grid.dtype == np.uint8
    # third pair: second row, first column
    assert np.array_equal(grid[6:10, 1:6], np.round(real[2] * 255).astype(np.uint8))
    assert np.array_equal(grid[6:10, 7:12], np.round(fitted[2] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        image_pairs_grid(real, fitted[:2])
