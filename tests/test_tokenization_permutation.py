"""Hidden-unit permutations leave every field's function unchanged; alignment undoes a known permutation."""

import pytest
import torch

from nef_transformers.fields.siren import siren_forward, siren_init
from nef_transformers.fields.spec import SirenSpec
from nef_transformers.tokenization.permutation import canonical_permutations, canonicalize, permute_hidden_units

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=4, omega_0=30.0)


def fields(num=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    init = siren_init(SPEC, 1, generator=generator)[0]
    weights = init + 0.05 * torch.randn(num, SPEC.num_params, generator=generator)
    return init, weights


def random_perms(num, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(SPEC.hidden_dim, generator=generator) for _ in range(num)])
            for _ in range(SPEC.num_layers - 1)]


def coords():
    return torch.rand(300, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("method", ["align", "sort"])
def test_canonical_form_keeps_every_field_output(method):
    init, weights = fields()
    # scramble the units first so the canonical form has work to do
    weights = permute_hidden_units(SPEC, weights, random_perms(len(weights), seed=3))
    canonical = canonicalize(SPEC, weights, method, reference=init)
    assert not torch.equal(canonical, weights)
    before = siren_forward(SPEC, weights.double(), coords().double())
    after = siren_forward(SPEC, canonical.double(), coords().double())
    per_field = (before - after).abs().amax(dim=(1, 2))
    assert torch.all(per_field < 1e-10), per_field


def test_align_undoes_a_known_permutation():
    _, weights = fields(num=5)
    reference = weights[0]
    scrambled = permute_hidden_units(SPEC, reference.expand(5, -1).clone(), random_perms(5, seed=7))
    assert not torch.equal(scrambled[1], reference)
    assert torch.equal(canonicalize(SPEC, scrambled, "align", reference=reference), reference.expand(5, -1))


def test_sort_orders_units_by_bias():
    init, weights = fields()
    canonical = canonicalize(SPEC, weights, "sort")
    params = SPEC.unflatten(canonical)
    for layer in range(SPEC.num_layers - 1):
        bias = params[f"layers.{layer}.bias"]
        assert torch.all(bias[:, :-1] >= bias[:, 1:])


def test_none_is_identity_and_errors_are_clear():
    init, weights = fields()
    assert torch.equal(canonicalize(SPEC, weights, "none"), weights)
    perms = canonical_permutations(SPEC, weights, "none")
    assert all(torch.equal(p, torch.arange(SPEC.hidden_dim).expand(len(weights), -1)) for p in perms)
    with pytest.raises(ValueError, match="needs a reference"):
        canonicalize(SPEC, weights, "align")
    with pytest.raises(ValueError, match="canonical method"):
        canonicalize(SPEC, weights, "rebasin")
    with pytest.raises(ValueError, match="3 hidden layers"):
        permute_hidden_units(SPEC, weights, random_perms(len(weights), 0)[:2])
