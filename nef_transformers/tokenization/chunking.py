"""Cut a field's flat weights into a sequence of chunks with structural positions, and back.

Per neuron (default, SANE-style: Schürholt et al., "Towards Scalable and Versatile Weight Space Learning",
ICML 2024, https://arxiv.org/abs/2406.09997): one chunk per neuron of every layer, holding the neuron's row of
incoming weights followed by its bias, zero-padded to the widest layer's ``fan_in + 1`` with a mask. Per
scalar (the proposal's 1-D codebook): one chunk of width 1 per parameter.

Chunks are taken relative to the shared initialisation: ``w - w_init`` is what varies between fields
(DESIGN.md step 3). Every structural fact comes from `SirenSpec.param_slices` (the one canonical order); the
chunker stores one gather index and never re-derives the layout.

Exactness: cutting and reassembling are an index gather and scatter, bit-exact. The residual ``w - w_init`` is
one floating-point subtraction: float64 weights come back bit-exact, float32 ones to within one rounding of the
subtraction (≤ half an ulp of the residual).

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` chunks (tokens), ``w`` chunk width.
"""

from __future__ import annotations

import json
import os

import torch

from ..fields.spec import SirenSpec

CHUNK_MODES = ("neuron", "scalar")
CONFIG_NAME = "chunker_config.json"
INIT_NAME = "shared_init.safetensors"


class NeuronChunker:
    """Flat weights ``(b, p)`` <-> chunks ``(b, t, w)`` with structural ids per chunk.

    Args:
        spec: the field architecture (canonical order: ``layers.{l}.weight (out, in)`` then ``layers.{l}.bias``).
        shared_init: ``(p,)`` initial weights every field started from; chunks hold ``w - shared_init``.
            None: chunks hold the weights themselves.
        mode: ``"neuron"`` (one chunk per neuron: incoming row + bias) or ``"scalar"`` (one chunk per parameter).

    Attributes:
        mask: ``(t, w)`` bool, True where a chunk entry is a real parameter (False = padding).
        layer_ids: ``(t,)`` layer of each chunk, 0 = first layer.
        neuron_ids: ``(t,)`` neuron (output row) of each chunk within its layer.
        slot_ids: ``(t,)`` position of the parameter inside its neuron's chunk (``0..fan_in-1`` weights,
            ``fan_in`` the bias); all 0 in ``"neuron"`` mode, where a chunk is the whole neuron.
        widths: ``(t,)`` number of real entries per chunk.
        index: ``(t, w)`` long, flat parameter index of each entry (0 where masked).
    """

    def __init__(self, spec: SirenSpec, shared_init: torch.Tensor | None = None, mode: str = "neuron"):
        if not isinstance(spec, SirenSpec):
            raise TypeError(f"spec must be a SirenSpec, got {type(spec).__name__}")
        if mode not in CHUNK_MODES:
            raise ValueError(f"chunking mode must be one of {CHUNK_MODES}, got {mode!r}")
        self.spec, self.mode = spec, mode
        if shared_init is not None:
            shared_init = torch.as_tensor(shared_init).detach().reshape(-1)
            if shared_init.numel() != spec.num_params:
                raise ValueError(f"shared_init has {shared_init.numel()} values, {spec} has {spec.num_params} parameters")
            shared_init = shared_init.clone()
        self.shared_init = shared_init
        self._build_layout()

    def _build_layout(self) -> None:
        slices = {name: sl for name, sl, _ in self.spec.param_slices()}
        rows, layer_ids, neuron_ids, slot_ids = [], [], [], []
        for layer, (fan_in, fan_out) in enumerate(self.spec.layer_dims):
            weight = torch.arange(slices[f"layers.{layer}.weight"].start, slices[f"layers.{layer}.weight"].stop)
            bias = torch.arange(slices[f"layers.{layer}.bias"].start, slices[f"layers.{layer}.bias"].stop)
            neuron_rows = torch.cat([weight.view(fan_out, fan_in), bias.view(fan_out, 1)], dim=1)  # (out, in + 1)
            for neuron in range(fan_out):
                if self.mode == "neuron":
                    rows.append(neuron_rows[neuron])
                    layer_ids.append(layer), neuron_ids.append(neuron), slot_ids.append(0)
                else:
                    for slot, flat in enumerate(neuron_rows[neuron].tolist()):
                        rows.append(torch.tensor([flat]))
                        layer_ids.append(layer), neuron_ids.append(neuron), slot_ids.append(slot)
        width = max(len(row) for row in rows)
        self.index = torch.zeros(len(rows), width, dtype=torch.long)
        self.mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for t, row in enumerate(rows):
            self.index[t, : len(row)] = row
            self.mask[t, : len(row)] = True
        self.layer_ids = torch.tensor(layer_ids, dtype=torch.long)
        self.neuron_ids = torch.tensor(neuron_ids, dtype=torch.long)
        self.slot_ids = torch.tensor(slot_ids, dtype=torch.long)
        self.widths = self.mask.sum(1)
        covered = torch.sort(self.index[self.mask]).values
        if not torch.equal(covered, torch.arange(self.spec.num_params)):
            raise AssertionError("internal error: the chunk layout does not cover every parameter exactly once")

    # --------------------------------------------------------------------------------------------- sizes
    @property
    def num_chunks(self) -> int:
        """``t``: chunks per field."""
        return self.index.shape[0]

    @property
    def chunk_width(self) -> int:
        """``w``: entries per chunk, padding included."""
        return self.index.shape[1]

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def max_neurons(self) -> int:
        """Largest neuron index + 1 (size of a neuron-id embedding)."""
        return int(self.neuron_ids.max()) + 1

    # --------------------------------------------------------------------------------------------- round trip
    def residual(self, weights: torch.Tensor) -> torch.Tensor:
        """``(b, p)`` weights -> ``(b, p)`` ``weights - shared_init`` (the weights themselves without a shared init)."""
        self.spec.check_weights(weights)
        if self.shared_init is None:
            return weights
        return weights - self.shared_init.to(device=weights.device, dtype=weights.dtype)

    def to_chunks(self, weights: torch.Tensor) -> torch.Tensor:
        """``(b, p)`` flat weights -> ``(b, t, w)`` chunks of ``w - w_init``, zeros where `mask` is False."""
        residual = self.residual(weights)
        index, mask = self.index.to(weights.device), self.mask.to(weights.device)
        chunks = residual[:, index]  # (b, t, w)
        return chunks.masked_fill(~mask, 0.0)

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """``(b, t, w)`` chunks -> ``(b, p)`` flat weights (padding entries are ignored)."""
        if not isinstance(chunks, torch.Tensor):
            raise TypeError(f"chunks must be a torch.Tensor of shape (b, {self.num_chunks}, {self.chunk_width}), "
                            f"got {type(chunks).__name__}")
        if chunks.ndim != 3 or tuple(chunks.shape[1:]) != (self.num_chunks, self.chunk_width):
            raise ValueError(f"chunks of shape {tuple(chunks.shape)} do not fit {self.spec} chunked per {self.mode}: "
                             f"expected (b, {self.num_chunks}, {self.chunk_width})")
        mask = self.mask.to(chunks.device)
        residual = chunks.new_empty(chunks.shape[0], self.spec.num_params)
        residual[:, self.index.to(chunks.device)[mask]] = chunks[:, mask]
        if self.shared_init is None:
            return residual
        return residual + self.shared_init.to(device=chunks.device, dtype=chunks.dtype)

    def structure_ids(self) -> dict[str, torch.Tensor]:
        """``{"layer_ids", "neuron_ids", "slot_ids"}``, each ``(t,)`` long."""
        return {"layer_ids": self.layer_ids.clone(), "neuron_ids": self.neuron_ids.clone(),
                "slot_ids": self.slot_ids.clone()}

    # --------------------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``chunker_config.json`` (spec, mode) and, with a shared init, ``shared_init.safetensors``."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = {"chunker": "NeuronChunker", "spec": self.spec.to_dict(), "mode": self.mode,
                  "shared_init": self.shared_init is not None}
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        if self.shared_init is not None:
            save_file({"shared_init": self.shared_init.float().contiguous()}, os.path.join(save_directory, INIT_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "NeuronChunker":
        """Load what `save_pretrained` wrote; a missing file raises a `FileNotFoundError` naming it."""
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: not a saved NeuronChunker")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        shared_init = None
        if config.get("shared_init"):
            init_path = os.path.join(directory, INIT_NAME)
            if not os.path.isfile(init_path):
                raise FileNotFoundError(f"{directory}: {CONFIG_NAME} says the chunks are relative to a shared init, "
                                        f"but {INIT_NAME} is missing")
            shared_init = load_file(init_path)["shared_init"]
        return cls(SirenSpec.from_dict(config["spec"]), shared_init, config["mode"])

    def __repr__(self) -> str:
        return (f"NeuronChunker(mode={self.mode!r}, chunks={self.num_chunks}, width={self.chunk_width}, "
                f"shared_init={'yes' if self.shared_init is not None else 'no'}, spec={self.spec})")


__all__ = ["CHUNK_MODES", "NeuronChunker"]
