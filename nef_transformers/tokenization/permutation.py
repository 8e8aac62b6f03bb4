"""Hidden-unit permutation symmetry: a canonical order of each field's hidden units.

Permuting the hidden units of layer ``l`` (rows of ``W_l`` and ``b_l``) together with the matching columns of
``W_{l+1}`` leaves an MLP's function unchanged (Hecht-Nielsen 1990; tested as in AllanYangZhou/nfn). Fields
fitted from a shared initialisation mostly keep their units aligned with it; fields from independent draws do
not. Methods:

- ``"none"``: keep the units as fitted (rely on the shared initialisation).
- ``"align"``: match each field's units to a reference's (the shared init) layer by layer, input first, with
  the Hungarian algorithm on the squared distance of the units' incoming weights and biases (the weight
  matching of Ainsworth et al., "Git Re-Basin", ICLR 2023, https://arxiv.org/abs/2209.04836, one pass
  forward). The previous layer's permutation is applied to the incoming columns before matching.
- ``"sort"``: order each layer's units by their bias, descending (a reference-free canonical form).

``benchmarks/tokenizer_fidelity.py`` measures which one reconstructs best after quantisation.

Axis legend: ``b`` fields, ``p`` flat parameters, ``h`` hidden units.
"""

from __future__ import annotations

import numpy as np
import torch

from ..fields.siren import layer_params
from ..fields.spec import SirenSpec

CANONICAL_METHODS = ("none", "align", "sort")


def permute_hidden_units(spec: SirenSpec, weights: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """Apply one permutation per hidden layer to every field; the function of each field is unchanged.

    Args:
        weights: ``(b, p)`` flat weights.
        perms: ``num_layers - 1`` long tensors of shape ``(b, h)``: new unit ``i`` of layer ``l`` is old unit
            ``perms[l][:, i]``.
    Returns:
        ``(b, p)`` permuted weights.
    """
    if len(perms) != spec.num_layers - 1:
        raise ValueError(f"{spec} has {spec.num_layers - 1} hidden layers, got {len(perms)} permutations")
    layers = [(w.clone(), b.clone()) for w, b in layer_params(spec, weights)]
    for layer, perm in enumerate(perms):
        weight, bias = layers[layer]
        if perm.shape != bias.shape:
            raise ValueError(f"permutation of layer {layer} has shape {tuple(perm.shape)}, expected {tuple(bias.shape)}")
        perm = perm.to(weights.device)
        rows = perm.unsqueeze(-1).expand(-1, -1, weight.shape[2])  # (b, h, in)
        layers[layer] = (torch.gather(weight, 1, rows), torch.gather(bias, 1, perm))
        next_weight, next_bias = layers[layer + 1]
        cols = perm.unsqueeze(1).expand(-1, next_weight.shape[1], -1)  # (b, out, h)
        layers[layer + 1] = (torch.gather(next_weight, 2, cols), next_bias)
    params = {}
    for layer, (weight, bias) in enumerate(layers):
        params[f"layers.{layer}.weight"], params[f"layers.{layer}.bias"] = weight, bias
    return spec.flatten(params)


def canonical_permutations(spec: SirenSpec, weights: torch.Tensor, method: str = "align",
                           reference: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The permutation of every hidden layer that brings each field to its canonical form (see module doc).

    Args:
        weights: ``(b, p)``.
        method: one of ``CANONICAL_METHODS``.
        reference: ``(p,)`` the weights to align to (``"align"`` only; the shared init).
    Returns:
        ``num_layers - 1`` long tensors ``(b, h)``, for `permute_hidden_units`.
    """
    if method not in CANONICAL_METHODS:
        raise ValueError(f"canonical method must be one of {CANONICAL_METHODS}, got {method!r}")
    spec.check_weights(weights)
    num_fields = weights.shape[0]
    hidden = spec.hidden_dim
    identity = torch.arange(hidden).expand(num_fields, -1).clone()
    if method == "none":
        return [identity.clone() for _ in range(spec.num_layers - 1)]
    layers = layer_params(spec, weights.detach().cpu())
    if method == "sort":
        return [torch.argsort(bias, dim=1, descending=True, stable=True) for _, bias in layers[:-1]]
    if reference is None:
        raise ValueError("canonical method 'align' needs a reference (the shared init); this dataset has none: "
                         "use 'sort' or 'none'")
    from scipy.optimize import linear_sum_assignment

    reference = torch.as_tensor(reference, dtype=weights.dtype).reshape(1, -1).cpu()
    spec.check_weights(reference)
    ref_layers = layer_params(spec, reference)
    perms, previous = [], None
    for layer in range(spec.num_layers - 1):
        weight, bias = layers[layer]
        if previous is not None:  # incoming columns follow the previous layer's new order
            weight = torch.gather(weight, 2, previous.unsqueeze(1).expand(-1, weight.shape[1], -1))
        units = torch.cat([weight, bias.unsqueeze(-1)], dim=2)  # (b, h, in + 1)
        ref_weight, ref_bias = ref_layers[layer]
        ref_units = torch.cat([ref_weight, ref_bias.unsqueeze(-1)], dim=2)[0]  # (h, in + 1)
        # cost[b, i, j]: reference unit i taken by field unit j
        cost = torch.cdist(ref_units.unsqueeze(0).expand(num_fields, -1, -1).double(), units.double()).square_()
        cost = cost.numpy()
        perm = np.empty((num_fields, hidden), dtype=np.int64)
        for field in range(num_fields):
            _, cols = linear_sum_assignment(cost[field])
            perm[field] = cols
        previous = torch.from_numpy(perm)
        perms.append(previous)
    return perms


def canonicalize(spec: SirenSpec, weights: torch.Tensor, method: str = "align",
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, p)`` weights -> ``(b, p)`` the same functions with their hidden units in canonical order."""
    if method == "none":
        spec.check_weights(weights)
        return weights
    return permute_hidden_units(spec, weights, canonical_permutations(spec, weights, method, reference))


__all__ = ["CANONICAL_METHODS", "canonical_permutations", "canonicalize", "permute_hidden_units"]
