"""`NefVQTokenizer`: neural-field weights <-> token ids through residual-VQ codebooks (a learned vocabulary).

A `PreTrainedTokenizer` with no text vocabulary, on ByT5's template (``models/byt5/tokenization_byt5.py``):
the vocabulary is three special tokens followed by the codes of every codebook. A field's weights are

1. put in canonical hidden-unit order (`permutation.py`; ``canonical="none"`` keeps the fitted order),
2. cut into chunks of ``w - w_init`` (`chunking.NeuronChunker`: one chunk per scalar, the default, or per
   neuron),
3. divided by a per-(chunk, entry) scale (so one codebook serves chunks of different layers),
4. quantised by a residual VQ (`quantizer.ResidualVQ`): ``levels`` codes per chunk,

and the sequence is ``<bos>``, then chunk by chunk in the canonical parameter order its codes level by level,
then ``<eos>``: MeshGPT's layout, where a face's codes are adjacent.

Why per scalar by default (``benchmarks/tokenizer_fidelity.py``, 4,500 training / 500 held-out MNIST fields of
2->32->32->1 at 34 dB): one 1,024-code scalar codebook loses ~0.1-0.2 dB at 1,185 codes per field, while
per-neuron residual VQ with 1,024-code codebooks loses ~22 dB at 3 levels (195 codes) and ~12 dB at 12 levels
(780 codes). The fields need ~3,900 bits each to stay within 1 dB even under an ideal code, which no
vocabulary of practical size packs into <= 256 tokens.

Vocabulary (``len(tokenizer)`` ids)::

    0 <pad>   1 <bos>   2 <eos>
    3 ...     codes: one id range of `codebook_size` ids per (codebook group, level), group-major

Every (group, level) codebook has its own id range, so an id says which codebook it indexes and a token
put at a position of another level or layer is caught, not silently decoded with the wrong codebook.
Token strings are ``<g{group}q{level}_{code}>``.

Structure (`structure_ids`): per position, ``layer_ids`` = layer + 1, ``neuron_ids`` = neuron + 1,
``level_ids`` = level + 1, and 0 at ``<bos>``/``<eos>`` (the reserved value): ready for ``nn.Embedding``.

Files (`save_pretrained`): ``tokenizer_config.json`` (the `SirenSpec`, chunking, levels, codebook size and
grouping, canonical form, normalisation name) and ``codebook.safetensors`` (``codebooks`` ``(q, g, k, d)``,
``scale`` ``(t, w)``, ``shared_init`` ``(p,)`` when the fields had one). A folder without the codebook file
raises instead of building a tokenizer with default codes (HF_NOTES.md trap 5).

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` chunks, ``w`` chunk width, ``n`` tokens per field
(BOS/EOS excluded), ``q`` levels, ``g`` codebook groups, ``k`` codes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import torch
from transformers.tokenization_python import AddedToken, PreTrainedTokenizer
from transformers.utils import logging

from ..fields.spec import SirenSpec
from .chunking import CHUNK_MODES, NeuronChunker
from .permutation import CANONICAL_METHODS, canonicalize
from .quantizer import ResidualVQ

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"codebook_file": "codebook.safetensors"}
CODEBOOK_GROUPINGS = ("per_layer", "by_width", "shared")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
# Value of every structural id at <bos>/<eos>; real layers, neurons and levels count from 1.
RESERVED_STRUCTURE_ID = 0
TOKEN_PATTERN = re.compile(r"^<g(\d+)q(\d+)_(\d+)>$")
CODEBOOK_FORMAT = "nef_transformers.nef_vq"
CODEBOOK_FORMAT_VERSION = "1"


class MissingCodebookError(ValueError):
    """A `NefVQTokenizer` was asked for without its ``codebook.safetensors``."""


def codebook_groups(chunker: NeuronChunker, grouping: str) -> torch.Tensor:
    """``(t,)`` codebook group of each chunk: its layer, its chunk width's rank, or 0 for all."""
    if grouping not in CODEBOOK_GROUPINGS:
        raise ValueError(f"codebook_grouping must be one of {CODEBOOK_GROUPINGS}, got {grouping!r}")
    if grouping == "per_layer":
        return chunker.layer_ids.clone()
    if grouping == "shared":
        return torch.zeros_like(chunker.layer_ids)
    widths = []
    for width in chunker.widths.tolist():
        if width not in widths:
            widths.append(width)
    return torch.tensor([widths.index(w) for w in chunker.widths.tolist()], dtype=torch.long)


def levels_per_group(groups_of_layers: dict[int, set[int]], levels_per_layer: Sequence[int]) -> list[int]:
    """Levels of each codebook group; every layer of a group must have the same number of levels."""
    levels = []
    for group in sorted(groups_of_layers):
        layer_levels = {levels_per_layer[layer] for layer in groups_of_layers[group]}
        if len(layer_levels) != 1:
            raise ValueError(f"layers {sorted(groups_of_layers[group])} share codebook group {group} but have "
                             f"different levels {sorted(layer_levels)}: give them the same number of levels or use "
                             f"codebook_grouping='per_layer'")
        levels.append(layer_levels.pop())
    return levels


class NefVQTokenizer(PreTrainedTokenizer):
    """Tokenizer of neural-field weights into residual-VQ codes (see the module docstring for the layout).

    Load one with `from_pretrained` / `AutoTokenizer.from_pretrained` (after ``import nef_transformers``), or
    train one with `nef_transformers.tokenization.train_tokenizer(dataset, strategy="vq")`.

    Args:
        codebook_file (`str`): path of ``codebook.safetensors``. Required unless ``codebook_state`` is given.
        spec (`dict`): the `SirenSpec` (as a dict) of the fields this tokenizer reads; the tokenizer exposes it
            as the `SirenSpec` ``siren_spec``.
        chunking (`str`, *optional*, defaults to `"scalar"`): `"scalar"` or `"neuron"` chunks.
        levels_per_layer (`list[int]`): RVQ levels (tokens per chunk) of each layer of the field.
        codebook_size (`int`): codes per codebook.
        codebook_grouping (`str`, *optional*, defaults to `"shared"`): which chunks share a codebook:
            `"shared"`, `"by_width"` (chunks of one width) or `"per_layer"`.
        canonical (`str`, *optional*, defaults to `"none"`): hidden-unit canonical form applied before
            chunking (`"none"`, `"align"` to the shared init, `"sort"` by bias); decoded fields keep it.
        normalization (`str`, *optional*, defaults to `"std"`): how ``scale`` was computed (recorded only).
        codebook_state (`dict`, *optional*): ``{"codebooks", "scale", "shared_init"}`` tensors, instead of a
            file (what training passes; never written to the JSON config).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        codebook_file: str | None = None,
        spec: dict | None = None,
        chunking: str = "scalar",
        levels_per_layer: list[int] | None = None,
        codebook_size: int | None = None,
        codebook_grouping: str = "shared",
        canonical: str = "none",
        normalization: str = "std",
        pad_token: str = "<pad>",
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        codebook_state: dict | None = None,
        **kwargs,
    ) -> None:
        # 1. the codebook tensors: required (a folder without them must not load as a default tokenizer)
        if codebook_state is None:
            codebook_state = self._read_codebook_file(codebook_file, kwargs.get("name_or_path"))
        if spec is None or levels_per_layer is None or codebook_size is None:
            missing = [n for n, v in (("spec", spec), ("levels_per_layer", levels_per_layer),
                                      ("codebook_size", codebook_size)) if v is None]
            raise ValueError(f"NefVQTokenizer settings {missing} are missing (tokenizer_config.json of a saved "
                             f"tokenizer holds them)")
        # 2. the settings, checked against each other and against the tensors
        self.siren_spec = spec if isinstance(spec, SirenSpec) else SirenSpec.from_dict(dict(spec))
        if chunking not in CHUNK_MODES:
            raise ValueError(f"chunking must be one of {CHUNK_MODES}, got {chunking!r}")
        if canonical not in CANONICAL_METHODS:
            raise ValueError(f"canonical must be one of {CANONICAL_METHODS}, got {canonical!r}")
        levels_per_layer = [int(v) for v in levels_per_layer]
        if len(levels_per_layer) != self.siren_spec.num_layers or min(levels_per_layer) < 1:
            raise ValueError(f"levels_per_layer must give >= 1 level for each of the {self.siren_spec.num_layers} "
                             f"layers of {self.siren_spec}, got {levels_per_layer}")
        self.chunking, self.canonical, self.normalization = chunking, canonical, normalization
        self.codebook_grouping, self.levels_per_layer = codebook_grouping, levels_per_layer
        self.codebook_size = int(codebook_size)
        shared_init = codebook_state.get("shared_init")
        self.chunker = NeuronChunker(self.siren_spec, shared_init, chunking)
        if canonical == "align" and shared_init is None:
            raise ValueError("canonical='align' aligns hidden units to the shared init, but this tokenizer has none")
        self.chunk_groups = codebook_groups(self.chunker, codebook_grouping)  # (t,)
        groups_of_layers: dict[int, set[int]] = {}
        for group, layer in zip(self.chunk_groups.tolist(), self.chunker.layer_ids.tolist()):
            groups_of_layers.setdefault(group, set()).add(layer)
        group_levels = levels_per_group(groups_of_layers, levels_per_layer)
        self.quantizer = ResidualVQ(self.chunker.chunk_width, self.codebook_size, group_levels)
        self._load_state(codebook_state)
        self._build_sequence_layout()
        # 3. the vocabulary, before super().__init__ (it asks for get_vocab)
        self._added_tokens_decoder = {
            i: AddedToken(token, special=True, normalized=False) for i, token in enumerate(SPECIAL_TOKENS)}
        kwargs.setdefault("special_tokens_pattern", "bos_eos")  # HF_NOTES.md trap 4: BOS/EOS really added
        super().__init__(
            spec=self.siren_spec.to_dict(), chunking=chunking, levels_per_layer=levels_per_layer,
            codebook_size=self.codebook_size, codebook_grouping=codebook_grouping, canonical=canonical,
            normalization=normalization, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, **kwargs,
        )
        if (self.pad_token_id, self.bos_token_id, self.eos_token_id) != (0, 1, 2):
            raise ValueError(f"NefVQTokenizer's special tokens must be {SPECIAL_TOKENS} at ids 0, 1, 2; got "
                             f"{(self.pad_token, self.bos_token, self.eos_token)} at "
                             f"{(self.pad_token_id, self.bos_token_id, self.eos_token_id)}")

    # ------------------------------------------------------------------------------------------ state
    @staticmethod
    def _read_codebook_file(codebook_file: str | None, where: str | None) -> dict:
        name = VOCAB_FILES_NAMES["codebook_file"]
        if codebook_file is None or not os.path.isfile(codebook_file):
            place = f" in {where!r}" if where else ""
            raise MissingCodebookError(
                f"NefVQTokenizer needs its codebook file {name!r}, but none was found{place}. A saved NefVQTokenizer "
                f"folder holds tokenizer_config.json and {name} (written by save_pretrained); train one with "
                f"nef_transformers.tokenization.train_tokenizer(dataset, strategy='vq') or `nef-transformers "
                f"tokenize --strategy vq`."
            )
        from safetensors import safe_open

        with safe_open(codebook_file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CODEBOOK_FORMAT:
                raise ValueError(f"{codebook_file} is not a NefVQTokenizer codebook file (format "
                                 f"{metadata.get('format')!r}, expected {CODEBOOK_FORMAT!r})")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        state["file_spec"] = metadata.get("spec")
        state["file"] = codebook_file
        return state

    def _load_state(self, state: dict) -> None:
        where = state.get("file", "codebook_state")
        file_spec = state.get("file_spec")
        if file_spec is not None and SirenSpec.from_json(file_spec) != self.siren_spec:
            raise ValueError(f"{where} was written for {SirenSpec.from_json(file_spec)} but tokenizer_config.json "
                             f"says {self.siren_spec}")
        missing = [key for key in ("codebooks", "scale") if key not in state]
        if missing:
            raise ValueError(f"{where} lacks the tensors {missing}")
        codebooks = torch.as_tensor(state["codebooks"], dtype=torch.float32)
        expected = tuple(self.quantizer.codebooks.shape)
        if tuple(codebooks.shape) != expected:
            raise ValueError(
                f"{where} holds codebooks of shape {tuple(codebooks.shape)} but the settings (levels "
                f"{self.levels_per_layer}, codebook_size {self.codebook_size}, grouping {self.codebook_grouping!r}, "
                f"chunk width {self.chunker.chunk_width}) need (levels, groups, codes, width) = {expected}")
        scale = torch.as_tensor(state["scale"], dtype=torch.float32)
        if tuple(scale.shape) != tuple(self.chunker.mask.shape):
            raise ValueError(f"{where} holds a scale of shape {tuple(scale.shape)}, chunks need "
                             f"{tuple(self.chunker.mask.shape)}")
        if not (torch.isfinite(codebooks).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"{where} holds non-finite codebooks or a non-positive scale")
        self.quantizer.codebooks.copy_(codebooks)
        self.quantizer.initted.fill_(True)
        self.scale = scale

    def _build_sequence_layout(self) -> None:
        """Positions of the codes: chunk by chunk, level by level; and the vocabulary ranges."""
        chunk_of, level_of = [], []
        for chunk, layer in enumerate(self.chunker.layer_ids.tolist()):
            for level in range(self.levels_per_layer[layer]):
                chunk_of.append(chunk), level_of.append(level)
        self.code_chunk = torch.tensor(chunk_of, dtype=torch.long)  # (n,)
        self.code_level = torch.tensor(level_of, dtype=torch.long)  # (n,)
        # One id range per (group, level), group-major.
        self.range_start = torch.full((self.quantizer.num_groups, self.quantizer.num_levels), -1, dtype=torch.long)
        start = len(SPECIAL_TOKENS)
        for group, levels in enumerate(self.quantizer.levels_per_group):
            for level in range(levels):
                self.range_start[group, level] = start
                start += self.codebook_size
        self._vocab_size = start
        self.code_offset = self.range_start[self.chunk_groups[self.code_chunk], self.code_level]  # (n,)

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def vocab_size(self) -> int:
        """Number of token ids, the 3 special tokens included (equals ``len(tokenizer)``)."""
        return self._vocab_size

    @property
    def tokens_per_field(self) -> int:
        """Codes per field, ``<bos>``/``<eos>`` excluded (``n``)."""
        return int(self.code_chunk.numel())

    @property
    def sequence_length(self) -> int:
        """Length of one field's ``input_ids``: codes + ``<bos>`` + ``<eos>``."""
        return self.tokens_per_field + 2

    def structure_ids(self) -> dict[str, torch.Tensor]:
        """Per position of ``input_ids`` (length `sequence_length`): ``layer_ids``, ``neuron_ids``, ``level_ids``
        (and ``slot_ids`` for scalar chunking), counted from 1; 0 (`RESERVED_STRUCTURE_ID`) at ``<bos>``/``<eos>``."""
        reserved = torch.tensor([RESERVED_STRUCTURE_ID])
        ids = {
            "layer_ids": self.chunker.layer_ids[self.code_chunk] + 1,
            "neuron_ids": self.chunker.neuron_ids[self.code_chunk] + 1,
            "level_ids": self.code_level + 1,
        }
        if self.chunking == "scalar":
            ids["slot_ids"] = self.chunker.slot_ids[self.code_chunk] + 1
        return {key: torch.cat([reserved, value, reserved]) for key, value in ids.items()}

    def token_id_ranges(self) -> torch.Tensor:
        """``(sequence_length, 2)`` long: ``[start, end)`` of the ids allowed at each position of ``input_ids``
        (``<bos>``, the codes of that position's codebook, ``<eos>``): what constrained sampling masks to."""
        starts = torch.cat([torch.tensor([self.bos_token_id]), self.code_offset, torch.tensor([self.eos_token_id])])
        sizes = torch.cat([torch.tensor([1]), torch.full_like(self.code_offset, self.codebook_size), torch.tensor([1])])
        return torch.stack([starts, starts + sizes], dim=1)

    # ------------------------------------------------------------------------------------------ vocab (HF API)
    def get_vocab(self) -> dict[str, int]:
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for group, levels in enumerate(self.quantizer.levels_per_group):
            for level in range(levels):
                start = int(self.range_start[group, level])
                for code in range(self.codebook_size):
                    vocab[f"<g{group}q{level}_{code}>"] = start + code
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """Token strings separated by whitespace (``"<g0q0_17> <g0q1_5>"``); weights go through `encode_weights`."""
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        match = TOKEN_PATTERN.match(token)
        if match is not None:
            group, level, code = (int(v) for v in match.groups())
            if group < self.quantizer.num_groups and level < self.quantizer.levels_per_group[group] \
                    and code < self.codebook_size:
                return int(self.range_start[group, level]) + code
        raise ValueError(f"{token!r} is not a token of this NefVQTokenizer (codes look like '<g0q0_17>' with "
                         f"groups < {self.quantizer.num_groups}, codes < {self.codebook_size})")

    def _convert_id_to_token(self, index: int) -> str:
        index = int(index)
        if 0 <= index < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[index]
        if not len(SPECIAL_TOKENS) <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        group, level = self._range_of(torch.tensor([index]))
        code = index - int(self.range_start[group, level])
        return f"<g{int(group)}q{int(level)}_{code}>"

    def _range_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, level) of code ids (``>= 3``)."""
        slot = (ids - len(SPECIAL_TOKENS)) // self.codebook_size
        starts = self.range_start.flatten()
        valid = torch.nonzero(starts >= 0).flatten()  # ranges in id order
        flat = valid[slot]
        return flat // self.quantizer.num_levels, flat % self.quantizer.num_levels

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write ``codebook.safetensors``: ``codebooks`` ``(q, g, k, d)``, ``scale`` ``(t, w)``, ``shared_init`` ``(p,)``."""
        from safetensors.torch import save_file

        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs an existing folder, got {save_directory!r}")
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "")
                            + VOCAB_FILES_NAMES["codebook_file"])
        tensors = {"codebooks": self.quantizer.codebooks.detach().contiguous(), "scale": self.scale.contiguous()}
        if self.chunker.shared_init is not None:
            tensors["shared_init"] = self.chunker.shared_init.float().contiguous()
        metadata = {"format": CODEBOOK_FORMAT, "format_version": CODEBOOK_FORMAT_VERSION, "spec": self.siren_spec.to_json(),
                    "levels_per_layer": json.dumps(self.levels_per_layer), "codebook_size": str(self.codebook_size),
                    "codebook_grouping": self.codebook_grouping, "chunking": self.chunking}
        save_file(tensors, path, metadata=metadata)
        return (path,)

    # ------------------------------------------------------------------------------------------ weights <-> ids
    def _check_field_weights(self, weights, spec: SirenSpec | None) -> torch.Tensor:
        if spec is not None and spec != self.siren_spec:
            raise ValueError(f"these weights belong to {spec}, but this tokenizer was trained for {self.siren_spec}")
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a torch.Tensor of shape (b, {self.siren_spec.num_params}), got "
                            f"{type(weights).__name__}")
        if weights.ndim == 1:
            weights = weights.unsqueeze(0)
        if weights.ndim != 2 or weights.shape[1] != self.siren_spec.num_params:
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit this tokenizer's {self.siren_spec}: it "
                             f"needs (b, {self.siren_spec.num_params}); weights of another SirenSpec need their own "
                             f"tokenizer")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be floating point, got {weights.dtype}")
        bad = ~torch.isfinite(weights).all(dim=1)
        if bad.any():
            raise ValueError(f"weights of fields {torch.nonzero(bad).flatten()[:10].tolist()} contain NaN or inf")
        return weights.float()

    @torch.no_grad()
    def encode_chunks(self, weights: torch.Tensor, spec: SirenSpec | None = None) -> torch.Tensor:
        """``(b, p)`` weights -> ``(b, t, w)`` the normalised chunks the codebooks quantise."""
        weights = self._check_field_weights(weights, spec)
        if self.canonical != "none":
            weights = canonicalize(self.siren_spec, weights, self.canonical, self.chunker.shared_init)
        return self.chunker.to_chunks(weights) / self.scale.to(weights.device)

    @torch.no_grad()
    def encode_weights(self, weights: torch.Tensor, spec: SirenSpec | None = None, batch_size: int = 1024) -> torch.Tensor:
        """``(b, p)`` flat weights -> ``(b, n + 2)`` long ``input_ids``: ``<bos>``, the codes, ``<eos>``.

        Args:
            spec: the `SirenSpec` of ``weights`` when known; a spec other than the tokenizer's raises.
            batch_size: fields quantised at once (bounds memory).
        """
        weights = self._check_field_weights(weights, spec)
        device, weights = weights.device, weights.detach().cpu()  # the codebooks live on the CPU
        outputs = []
        for start in range(0, weights.shape[0], batch_size):
            chunks = self.encode_chunks(weights[start:start + batch_size])  # (b, t, w)
            num = chunks.shape[0]
            mask = self.chunker.mask.expand(num, -1, -1).reshape(-1, self.chunker.chunk_width)
            groups = self.chunk_groups.expand(num, -1).reshape(-1)
            codes = self.quantizer.encode(chunks.reshape(-1, self.chunker.chunk_width), mask, groups)
            codes = codes.view(num, self.chunker.num_chunks, -1)  # (b, t, q)
            ids = codes[:, self.code_chunk, self.code_level] + self.code_offset  # (b, n)
            special = torch.tensor([[self.bos_token_id]], dtype=torch.long).expand(num, 1)
            outputs.append(torch.cat([special, ids, special + (self.eos_token_id - self.bos_token_id)], dim=1))
        return torch.cat(outputs).to(device)

    def encode_dataset(self, dataset, batch_size: int = 1024) -> torch.Tensor:
        """``input_ids`` of every field of a weight dataset; its `SirenSpec` and shared init must be this tokenizer's."""
        from ..data.metadata import get_shared_init, get_spec, weights_tensor

        spec = get_spec(dataset)
        if spec != self.siren_spec:
            raise ValueError(f"the dataset holds fields of {spec}, but this tokenizer was trained for {self.siren_spec}")
        init, ours = get_shared_init(dataset), self.chunker.shared_init
        if (init is None) != (ours is None) or (init is not None and not torch.equal(init, ours.float())):
            raise ValueError("the dataset's shared initialisation differs from the one this tokenizer was trained "
                             "with: its residuals w - w_init would be meaningless")
        return self.encode_weights(weights_tensor(dataset), spec=spec, batch_size=batch_size)

    def check_input_ids(self, input_ids) -> torch.Tensor:
        """Validate ``input_ids`` ``(b, n + 2)`` (or one ``(n + 2,)`` sequence) and return them as a long tensor."""
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (b, {self.sequence_length}), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integers, got {ids.dtype}")
        ids = ids.long()
        if ids.shape[1] != self.sequence_length:
            raise ValueError(
                f"sequences of length {ids.shape[1]} do not fit this tokenizer: its {self.siren_spec} chunked per "
                f"{self.chunking} with levels {self.levels_per_layer} gives {self.tokens_per_field} codes + <bos> + "
                f"<eos> = {self.sequence_length} ids per field")
        outside = (ids < 0) | (ids >= self.vocab_size)
        if outside.any():
            row, col = (int(v) for v in torch.nonzero(outside)[0])
            raise ValueError(f"token id {int(ids[row, col])} (field {row}, position {col}) is outside the vocabulary "
                             f"0..{self.vocab_size - 1}")
        if (ids[:, 0] != self.bos_token_id).any() or (ids[:, -1] != self.eos_token_id).any():
            row = int(torch.nonzero((ids[:, 0] != self.bos_token_id) | (ids[:, -1] != self.eos_token_id))[0])
            raise ValueError(f"field {row} does not start with <bos> ({self.bos_token_id}) and end with <eos> "
                             f"({self.eos_token_id}): got {int(ids[row, 0])} ... {int(ids[row, -1])}")
        body = ids[:, 1:-1]
        special = body < len(SPECIAL_TOKENS)
        if special.any():
            row, col = (int(v) for v in torch.nonzero(special)[0])
            raise ValueError(f"special token {SPECIAL_TOKENS[int(body[row, col])]} in the middle of field {row} "
                             f"(position {col + 1}); only codes may sit between <bos> and <eos>")
        codes = body - self.code_offset
        wrong = (codes < 0) | (codes >= self.codebook_size)
        if wrong.any():
            row, col = (int(v) for v in torch.nonzero(wrong)[0])
            group, level = (int(v) for v in self._range_of(body[row, col].view(1)))
            chunk = int(self.code_chunk[col])
            raise ValueError(
                f"token id {int(body[row, col])} at position {col + 1} of field {row} is a code of group {group} "
                f"level {level}, but that position holds level {int(self.code_level[col])} of layer "
                f"{int(self.chunker.layer_ids[chunk])} (group {int(self.chunk_groups[chunk])}): ids "
                f"{int(self.code_offset[col])}..{int(self.code_offset[col]) + self.codebook_size - 1}")
        return ids

    @torch.no_grad()
    def decode_weights(self, input_ids) -> torch.Tensor:
        """``(b, n + 2)`` ``input_ids`` (``<bos>`` codes ``<eos>``) -> ``(b, p)`` float32 flat weights."""
        ids = self.check_input_ids(input_ids)
        device, ids = ids.device, ids.cpu()
        num = ids.shape[0]
        codes = torch.full((num, self.chunker.num_chunks, self.quantizer.num_levels), -1, dtype=torch.long)
        codes[:, self.code_chunk, self.code_level] = ids[:, 1:-1] - self.code_offset
        groups = self.chunk_groups.expand(num, -1).reshape(-1)
        mask = self.chunker.mask.expand(num, -1, -1).reshape(-1, self.chunker.chunk_width)
        chunks = self.quantizer.decode(codes.view(-1, self.quantizer.num_levels), groups, mask)
        chunks = chunks.view(num, self.chunker.num_chunks, -1) * self.scale
        return self.chunker.from_chunks(chunks).to(device)

    def check_vocab_matches(self, model_config) -> None:
        """Raise a `ValueError` naming each mismatch between this tokenizer and a model config (vocab size,
        special token ids, sequence length)."""
        problems = []
        vocab = getattr(model_config, "vocab_size", None)
        if vocab != self.vocab_size:
            problems.append(f"the model's vocab_size is {vocab} but this tokenizer has {self.vocab_size} token ids")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            theirs, ours = getattr(model_config, name, None), getattr(self, name)
            if theirs is not None and theirs != ours:
                problems.append(f"{name}: model {theirs}, tokenizer {ours}")
        positions = getattr(model_config, "max_position_embeddings", None)
        if positions is not None and positions < self.sequence_length:
            problems.append(f"the model reads at most {positions} positions, a field takes {self.sequence_length}")
        if problems:
            raise ValueError("model config and NefVQTokenizer disagree: " + "; ".join(problems))


def register_tokenizer() -> None:
    """Register `NefVQTokenizer` with `AutoTokenizer` for `NefGPTConfig` (called once from registration.py)."""
    from transformers import AutoTokenizer

    from ..models.nef_gpt.configuration_nef_gpt import NefGPTConfig

    AutoTokenizer.register(NefGPTConfig, tokenizer_class=NefVQTokenizer, exist_ok=True)


__all__ = ["MissingCodebookError", "NefVQTokenizer", "register_tokenizer"]
