"""`SirenSpec`: the architecture of a neural field and the one canonical flat order of its parameters.

Every part of the package (fitter, tokenizer, model, pipeline, loaders) flattens and unflattens weights
through this module and never re-derives the order (the fit-a-nef `SIREN_key` habit).

Canonical order, layer by layer from the input: ``layers.{l}.weight`` of shape ``(out, in)`` (torch layout:
row ``j`` holds the incoming weights of neuron ``j``), then ``layers.{l}.bias`` of shape ``(out,)``.

Axis legend: ``b`` fields, ``p`` flat parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Iterator

import torch

ACTIVATIONS = ("sine", "relu")


@dataclass(frozen=True)
class SirenSpec:
    """Architecture of one neural field: an MLP of ``num_layers`` linear layers.

    Args:
        in_dim: coordinate dimension (2 for images, 3 for shapes).
        out_dim: signal dimension (1 for grey images and occupancy logits, 3 for RGB).
        hidden_dim: width of every hidden layer.
        num_layers: number of linear layers, the output layer included (fit-a-nef counts the same way:
            ``num_layers - 1`` sine layers, then a linear output).
        omega_0: frequency of every sine layer, the first included (fit-a-nef). Ignored for ``relu``.
        activation: ``"sine"`` (SIREN) or ``"relu"`` (only to read HyperDiffusion's ReLU MLPs).
        num_frequencies: NeRF positional-encoding frequencies applied to the coordinates before the first
            layer (0 = none, the SIREN default; HyperDiffusion uses 4, input included).
    """

    in_dim: int = 2
    out_dim: int = 1
    hidden_dim: int = 32
    # 3 layers = 2 sine layers + linear output: 2->32->32->1 reaches >= 30 dB on MNIST in ~100 steps.
    num_layers: int = 3
    # 30 as in the SIREN paper; fit-a-nef's 8 stays at ~15 dB on MNIST (ANCHORS.md, measured here).
    omega_0: float = 30.0
    activation: str = "sine"
    num_frequencies: int = 0

    def __post_init__(self):
        for name in ("in_dim", "out_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SirenSpec.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 2:
            raise ValueError(f"SirenSpec.num_layers must be an int >= 2 (one hidden layer and the output), got {self.num_layers!r}")
        if not (isinstance(self.omega_0, (int, float)) and math.isfinite(self.omega_0) and self.omega_0 > 0):
            raise ValueError(f"SirenSpec.omega_0 must be a finite number > 0, got {self.omega_0!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SirenSpec.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.num_frequencies, int) or self.num_frequencies < 0:
            raise ValueError(f"SirenSpec.num_frequencies must be an int >= 0, got {self.num_frequencies!r}")
        object.__setattr__(self, "omega_0", float(self.omega_0))

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def encoded_dim(self) -> int:
        """Width of the first layer's input: coordinates plus their sin/cos positional encoding."""
        return self.in_dim * (1 + 2 * self.num_frequencies)

    @property
    def layer_dims(self) -> list[tuple[int, int]]:
        """``(in, out)`` of every linear layer, input first."""
        dims = [self.encoded_dim] + [self.hidden_dim] * (self.num_layers - 1) + [self.out_dim]
        return list(zip(dims[:-1], dims[1:]))

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in the canonical flat order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, (fan_in, fan_out) in enumerate(self.layer_dims):
            shapes[f"layers.{layer}.weight"] = (fan_out, fan_in)
            shapes[f"layers.{layer}.bias"] = (fan_out,)
        return shapes

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes.values())

    def param_slices(self) -> Iterator[tuple[str, slice, tuple[int, ...]]]:
        """``(name, slice into the flat vector, shape)`` in canonical order."""
        start = 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            yield name, slice(start, start + size), shape
            start += size

    def unflatten(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(b, p)`` flat weights -> ``{name: (b, *shape)}`` views, canonical order."""
        self.check_weights(weights)
        return {name: weights[:, sl].view(weights.shape[0], *shape) for name, sl, shape in self.param_slices()}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (b, *shape)}`` -> ``(b, p)`` flat weights, canonical order."""
        missing = [name for name in self.param_shapes if name not in params]
        extra = [name for name in params if name not in self.param_shapes]
        if missing or extra:
            raise ValueError(f"parameters do not match {self}: missing {missing}, unexpected {extra}")
        parts = []
        for name, shape in self.param_shapes.items():
            tensor = params[name]
            if tuple(tensor.shape[1:]) != shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape[1:])} per field, expected {shape}")
            parts.append(tensor.reshape(tensor.shape[0], -1))
        return torch.cat(parts, dim=1)

    def check_weights(self, weights: torch.Tensor) -> None:
        """Raise a ValueError unless ``weights`` is a ``(b, p)`` tensor with ``p == num_params``."""
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a torch.Tensor of shape (b, {self.num_params}), got {type(weights).__name__}")
        if weights.ndim != 2 or weights.shape[1] != self.num_params:
            raise ValueError(
                f"weights of shape {tuple(weights.shape)} do not fit {self}: expected (b, {self.num_params})"
            )

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SirenSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SirenSpec fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SirenSpec":
        return cls.from_dict(json.loads(text))
