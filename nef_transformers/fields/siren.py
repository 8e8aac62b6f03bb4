"""A batched functional SIREN: ``b`` fields with stacked parameters evaluated on their coordinates at once.

SIREN: Sitzmann et al., "Implicit Neural Representations with Periodic Activation Functions", NeurIPS 2020,
https://arxiv.org/abs/2006.09661 — ``num_layers - 1`` layers ``sin(omega_0 · (x Wᵀ + b))`` (``omega_0`` on
every sine layer, the first included, as fit-a-nef) followed by a linear output layer.

Axis legend: ``b`` fields, ``n`` coordinates, ``p`` flat parameters, ``d`` features.
"""

from __future__ import annotations

import math

import torch

from .spec import SirenSpec


def siren_init(spec: SirenSpec, num_fields: int = 1, shared: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial flat weights ``(num_fields, p)`` for ``spec``, canonical order.

    fit-a-nef's SIREN initialisation (Sitzmann et al. 2020, Sec. 3.2 and supplement 1.5):

    - first layer:  ``W ~ U(-1/fan_in, 1/fan_in)``
    - hidden layers: ``W ~ U(-sqrt(6/fan_in)/omega_0, +sqrt(6/fan_in)/omega_0)``
    - output layer: ``W ~ N(0, 1/fan_in)``
    - every bias 0.

    For ``relu`` specs (HyperDiffusion's MLPs) every weight is ``U(±1/sqrt(fan_in))`` (torch's ``nn.Linear``).

    Args:
        shared: one draw repeated for every field (fit-a-nef ``SharedInit``; what keeps hidden units aligned
            across fields and makes the weight space learnable) or an independent draw per field.
        generator: the random stream; seed it for reproducible fields.
    """
    if num_fields < 1:
        raise ValueError(f"num_fields must be >= 1, got {num_fields}")
    draws = 1 if shared else num_fields
    params: dict[str, torch.Tensor] = {}
    last = len(spec.layer_dims) - 1
    for layer, (fan_in, fan_out) in enumerate(spec.layer_dims):
        shape = (draws, fan_out, fan_in)
        if spec.activation == "relu":
            weight = (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
        elif layer == 0:
            weight = (torch.rand(shape, generator=generator) * 2 - 1) / fan_in
        elif layer < last:
            weight = (torch.rand(shape, generator=generator) * 2 - 1) * math.sqrt(6.0 / fan_in) / spec.omega_0
        else:
            weight = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        params[f"layers.{layer}.weight"] = weight
        params[f"layers.{layer}.bias"] = torch.zeros(draws, fan_out)
    flat = spec.flatten(params)
    return flat.expand(num_fields, -1).contiguous() if shared else flat


def positional_encoding(coords: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """HyperDiffusion's NeRF encoding ``[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(F-1) x), cos(2^(F-1) x)]``.

    Exactly Rgtemze/HyperDiffusion ``embedder.py`` (from nerf-pytorch) as ``MLP3D`` configures it:
    ``include_input=True``, ``log_sampling=True`` (frequencies ``2^k``, k = 0..F-1), **no π**, and per frequency
    a ``sin`` block of all ``d`` coordinates, then a ``cos`` block. Output width ``d (1 + 2F)``.
    """
    if num_frequencies == 0:
        return coords
    frequencies = 2.0 ** torch.arange(num_frequencies, dtype=coords.dtype, device=coords.device)
    scaled = coords[..., None, :] * frequencies[:, None]  # (..., F, d)
    encoded = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)  # (..., F, 2, d)
    return torch.cat([coords, encoded.flatten(-3)], dim=-1)


def layer_params(spec: SirenSpec, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(W (b, out, in), bias (b, out)), ...]`` views into flat ``(b, p)`` weights."""
    params = spec.unflatten(weights)
    return [(params[f"layers.{l}.weight"], params[f"layers.{l}.bias"]) for l in range(spec.num_layers)]


def siren_forward_layers(spec: SirenSpec, layers: list[tuple[torch.Tensor, torch.Tensor]], coords: torch.Tensor) -> torch.Tensor:
    """Evaluate ``b`` fields given per-layer ``(W (b, out, in), bias (b, out))``.

    Args:
        coords: ``(n, d_in)`` shared by every field, or ``(b, n, d_in)`` per field.
    Returns:
        ``(b, n, out_dim)``.
    """
    num_fields = layers[0][0].shape[0]
    if coords.ndim == 2:
        coords = coords.unsqueeze(0).expand(num_fields, -1, -1)
    if coords.ndim != 3 or coords.shape[0] != num_fields or coords.shape[-1] != spec.in_dim:
        raise ValueError(f"coords of shape {tuple(coords.shape)} do not fit {num_fields} fields of {spec}: "
                         f"expected (n, {spec.in_dim}) or ({num_fields}, n, {spec.in_dim})")
    hidden = positional_encoding(coords, spec.num_frequencies)
    last = len(layers) - 1
    for layer, (weight, bias) in enumerate(layers):
        # (b, n, in) @ (b, in, out) + (b, 1, out) -> (b, n, out)
        hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))
        if layer < last:
            hidden = torch.sin(spec.omega_0 * hidden) if spec.activation == "sine" else torch.relu(hidden)
    return hidden


def siren_forward(spec: SirenSpec, weights: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Evaluate ``b`` fields with flat weights ``(b, p)`` on coords ``(n, d_in)`` or ``(b, n, d_in)`` -> ``(b, n, out_dim)``."""
    return siren_forward_layers(spec, layer_params(spec, weights), coords)


def evaluate_in_chunks(spec: SirenSpec, weights: torch.Tensor, coords: torch.Tensor, chunk_points: int = 65536) -> torch.Tensor:
    """`siren_forward` over many coordinates in chunks of ``chunk_points`` (bounded memory), no autograd."""
    outputs = []
    with torch.no_grad():
        for start in range(0, coords.shape[-2], chunk_points):
            outputs.append(siren_forward(spec, weights, coords[..., start:start + chunk_points, :]))
    return torch.cat(outputs, dim=1)
