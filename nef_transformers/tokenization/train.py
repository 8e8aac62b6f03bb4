"""Train a tokenization of a weight dataset and tokenise it: ``naive`` chunks, a ``learned`` embedding, or a
``vq`` vocabulary (`NefVQTokenizer`). The ``nef-transformers tokenize`` command that calls it is in `command.py`.

Output folder of `train_tokenizer(..., out_dir=OUT)`::

    OUT/tokenizer/   vq: tokenizer_config.json + codebook.safetensors (AutoTokenizer.from_pretrained loads it)
                     naive: chunker_config.json + shared_init.safetensors (NeuronChunker.from_pretrained)
                     learned: config.json + model.safetensors (NefAutoencoder.from_pretrained)
    OUT/dataset/     the tokenised training set (save_to_disk): ``input_ids`` (vq) or ``chunks`` (naive:
                     ``(t, w)`` chunks of ``w - w_init``; learned: ``(t, latent_dim)`` latents), ``label``, ``index``
    OUT/tokenize.json  strategy, settings, sizes and the training statistics

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` chunks, ``w`` chunk width.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..fields.spec import SirenSpec
from .chunking import CHUNK_MODES, NeuronChunker
from .permutation import CANONICAL_METHODS, canonicalize
from .quantizer import ResidualVQ

logger = logging.getLogger(__name__)

STRATEGIES = ("vq", "naive", "learned", "code")
# The learned strategy on occupancy fields (shapes): each autoencoder step compares the outputs on 4,096 points
# drawn afresh from 32,768 uniform ones in the shape cube, half of them per field near its surface, with the
# binary KL of the occupancies (`NefAutoencoderConfig.function_loss="kl"`); benchmarks/RESULTS.md has the evidence.
SHAPE_AUTOENCODER_POOL = 32768
SHAPE_AUTOENCODER_POINTS = 4096
SHAPE_AUTOENCODER_SURFACE = 0.5
# Autoencoder batch (fields per step): 711 chairs make 12 steps an epoch at 64, and the autoencoder is short of
# steps, not of fields: at 16 (same epochs, less time) its ceiling went from 1-NNA 94.1 % to 82.6 %.
AUTOENCODER_BATCH_SIZE = 64
SHAPE_AUTOENCODER_BATCH_SIZE = 16


def autoencoder_defaults(kind: str | None) -> dict:
    """The learned strategy's per-source defaults: ``{"function_loss", "batch_size"}`` for a source ``kind``
    (occupancy KL and 16 fields per step for ``"occupancy"``, MSE and 64 otherwise)."""
    if kind == "occupancy":
        return {"function_loss": "kl", "batch_size": SHAPE_AUTOENCODER_BATCH_SIZE}
    return {"function_loss": "mse", "batch_size": AUTOENCODER_BATCH_SIZE}
NORMALIZATIONS = ("std", "none")


@dataclass(frozen=True)
class VQTokenizerConfig:
    """How a `NefVQTokenizer` is trained (numbers: ``benchmarks/tokenizer_fidelity.py``).

    The default cuts fields per scalar with one shared 1,024-code 1-D codebook: on 500 held-out MNIST fields
    (2->32->32->1, 34.2 dB) it loses 0.07 dB PSNR at 1,185 tokens per field, all codes in use. A SIREN fitted
    to 34 dB needs about 3,900 bits per field to stay within 1 dB even under an ideal function-aware code
    (the benchmark's bound), so no codebook of practical size reaches that at <= 256 tokens:
    ``COMPACT_VQ_CONFIG`` (per-neuron RVQ, 3 levels, 197 ids) exists for short sequences and loses 21.7 dB.
    Hidden-unit canonical forms made it worse (align 0.24 dB, sort 0.66 dB): ``canonical="none"``.
    """

    chunking: str = "scalar"
    # RVQ levels (tokens per chunk): one int for every layer, or one per layer.
    levels: int | tuple[int, ...] = 1
    codebook_size: int = 1024
    # Which chunks share a codebook: "shared", "by_width" (chunks of one width) or "per_layer".
    codebook_grouping: str = "shared"
    # Hidden-unit canonical form before chunking: "none" (shared init keeps units aligned), "align", "sort".
    canonical: str = "none"
    # Divide each chunk entry by the std of its (layer, column) over the training set, so that one codebook
    # serves layers whose residuals differ in scale (first layer ~0.025, output ~0.06 on MNIST).
    normalization: str = "std"
    epochs: int = 1
    # Vectors per EMA update.
    batch_size: int = 65536
    kmeans_iters: int = 10
    # Training vectors per codebook for the k-means init (default 64 x codebook_size).
    kmeans_points: int | None = None
    decay: float = 0.99
    # A code whose EMA count falls below this (vectors per batch) is restarted on a batch vector. Kept low:
    # 1-D codebooks need their rarely used tail codes, which carry the largest weights.
    dead_code_threshold: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.chunking not in CHUNK_MODES:
            raise ValueError(f"VQTokenizerConfig.chunking must be one of {CHUNK_MODES}, got {self.chunking!r}")
        levels = (self.levels,) if isinstance(self.levels, int) else tuple(self.levels)
        if not levels or min(levels) < 1:
            raise ValueError(f"VQTokenizerConfig.levels must be >= 1 (one int or one per layer), got {self.levels!r}")
        if self.codebook_size < 2:
            raise ValueError(f"VQTokenizerConfig.codebook_size must be >= 2, got {self.codebook_size}")
        if self.canonical not in CANONICAL_METHODS:
            raise ValueError(f"VQTokenizerConfig.canonical must be one of {CANONICAL_METHODS}, got {self.canonical!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"VQTokenizerConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.kmeans_iters < 0:
            raise ValueError(f"VQTokenizerConfig: epochs >= 0, batch_size >= 1 and kmeans_iters >= 0 are needed, got "
                             f"{self.epochs}, {self.batch_size}, {self.kmeans_iters}")

    def levels_per_layer(self, spec: SirenSpec) -> list[int]:
        if isinstance(self.levels, int):
            return [self.levels] * spec.num_layers
        if len(self.levels) != spec.num_layers:
            raise ValueError(f"VQTokenizerConfig.levels gives {len(self.levels)} values, {spec} has {spec.num_layers} layers")
        return [int(v) for v in self.levels]

    def to_dict(self) -> dict:
        return asdict(self)


# Short sequences (<= 256 ids for 2->32->32->1) at a large fidelity cost: see VQTokenizerConfig.
COMPACT_VQ_CONFIG = VQTokenizerConfig(chunking="neuron", levels=3, codebook_size=1024, codebook_grouping="by_width",
                                      epochs=2, batch_size=16384, dead_code_threshold=1.0)


def chunk_scale(chunker: NeuronChunker, chunks: torch.Tensor, method: str = "std") -> torch.Tensor:
    """``(t, w)`` positive scale per chunk entry: the std of its (layer, column) over ``chunks (b, t, w)``.

    A column is the entry's place in its neuron row (input ``i`` or the bias): per neuron chunking takes the
    std over fields and neurons, per scalar chunking the same statistic for each scalar's (layer, slot).
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    scale = torch.ones(chunker.num_chunks, chunker.chunk_width)
    if method == "none":
        return scale
    column = chunker.slot_ids if chunker.mode == "scalar" else None
    for layer in range(chunker.num_layers):
        in_layer = chunker.layer_ids == layer
        values = chunks[:, in_layer].double()  # (b, t_l, w)
        if column is None:
            std = values.reshape(-1, chunker.chunk_width).std(0)  # per column of the neuron row
            scale[in_layer] = std.float()
        else:
            slots = column[in_layer]
            for slot in torch.unique(slots).tolist():
                scale[torch.nonzero(in_layer).flatten()[slots == slot]] = values[:, slots == slot].std().float()
    scale = torch.where(torch.isfinite(scale) & (scale > 1e-12), scale, torch.ones_like(scale))
    return torch.where(chunker.mask, scale, torch.ones_like(scale))


def train_vq_tokenizer(weights: torch.Tensor, spec: SirenSpec, shared_init: torch.Tensor | None,
                       config: VQTokenizerConfig = VQTokenizerConfig(), progress: bool = True):
    """Train a `NefVQTokenizer` on ``weights (b, p)``; returns ``(tokenizer, info)`` with the training stats."""
    from .tokenization_nef_vq import NefVQTokenizer, codebook_groups, levels_per_group

    spec.check_weights(weights)
    weights = weights.float()
    if config.canonical != "none":
        weights = canonicalize(spec, weights, config.canonical, shared_init)
    chunker = NeuronChunker(spec, shared_init, config.chunking)
    chunks = chunker.to_chunks(weights)
    scale = chunk_scale(chunker, chunks, config.normalization)
    groups = codebook_groups(chunker, config.codebook_grouping)
    levels = config.levels_per_layer(spec)
    groups_of_layers: dict[int, set[int]] = {}
    for group, layer in zip(groups.tolist(), chunker.layer_ids.tolist()):
        groups_of_layers.setdefault(group, set()).add(layer)
    quantizer = ResidualVQ(chunker.chunk_width, config.codebook_size, levels_per_group(groups_of_layers, levels),
                           decay=config.decay, kmeans_iters=config.kmeans_iters,
                           dead_code_threshold=config.dead_code_threshold)
    num = weights.shape[0]
    x = (chunks / scale).reshape(-1, chunker.chunk_width)
    mask = chunker.mask.expand(num, -1, -1).reshape(-1, chunker.chunk_width)
    vector_groups = groups.expand(num, -1).reshape(-1)
    for group in range(quantizer.num_groups):
        count = int((vector_groups == group).sum())
        if count < 4 * config.codebook_size:
            logger.warning("codebook group %d has %d training vectors for %d codes: many codes will stay unused "
                           "(use fewer codes, more fields, or another codebook_grouping)", group, count,
                           config.codebook_size)
    stats = quantizer.fit(x, mask, vector_groups, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                          kmeans_points=config.kmeans_points or 64 * config.codebook_size, progress=progress)
    tokenizer = NefVQTokenizer(
        spec=spec.to_dict(), chunking=config.chunking, levels_per_layer=levels, codebook_size=config.codebook_size,
        codebook_grouping=config.codebook_grouping, canonical=config.canonical, normalization=config.normalization,
        codebook_state={"codebooks": quantizer.codebooks.clone(), "scale": scale, "shared_init": shared_init},
    )
    return tokenizer, {"restarted_codes_per_epoch": stats["restarted"]}


def codebook_usage(tokenizer, input_ids: torch.Tensor) -> dict:
    """Share of codes in use, share of dead codes and mean perplexity of the codebooks over ``input_ids``."""
    from .quantizer import perplexity

    ids = tokenizer.check_input_ids(input_ids)[:, 1:-1]
    used, total, perplexities = 0, 0, []
    for start in tokenizer.range_start.flatten().tolist():
        if start < 0:
            continue
        codes = ids[(ids >= start) & (ids < start + tokenizer.codebook_size)] - start
        used += int(torch.unique(codes).numel())
        total += tokenizer.codebook_size
        perplexities.append(perplexity(codes, tokenizer.codebook_size))
    return {"codes_in_use": used / total, "dead_codes": 1.0 - used / total,
            "perplexity": float(np.nanmean(perplexities)), "codebook_size": tokenizer.codebook_size}


# ---------------------------------------------------------------------------------------------- entry point
@dataclass
class TokenizationResult:
    """What `train_tokenizer` returns: the trained tokenization, the tokenised training set, training stats."""

    strategy: str
    tokenizer: object  # NefVQTokenizer | NeuronChunker | NefAutoencoder | NefCodeVAE
    dataset: object  # datasets.Dataset with input_ids or chunks
    info: dict = field(default_factory=dict)


def field_coords(source: dict, spec: SirenSpec, num_points: int = 4096, seed: int = 0) -> torch.Tensor:
    """Where the learned embedding compares field outputs: the pixel grid of an image source, uniform points
    in the shape cube ``[-0.5, 0.5]³`` otherwise."""
    if source.get("kind") == "image" and source.get("image_shape"):
        from ..data.images import image_grid

        height, width = source["image_shape"][:2]
        return image_grid(height, width)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_points, spec.in_dim, generator=generator) - 0.5


def _chunks_dataset(values: torch.Tensor, dataset):
    """A `datasets.Dataset` with a ``chunks`` column ``(t, w)`` float32 plus ``label`` and ``index``."""
    from datasets import Array2D, Dataset, Features, Value

    num, t, w = values.shape
    features = Features({"chunks": Array2D((t, w), "float32"), "label": Value("int64"), "index": Value("int64")})
    return Dataset.from_dict({"chunks": values.numpy(), "label": dataset["label"], "index": dataset["index"]},
                             features=features)


def train_tokenizer(
    dataset,
    strategy: str = "vq",
    out_dir: str | os.PathLike | None = None,
    vq_config: VQTokenizerConfig | None = None,
    chunking: str = "neuron",
    autoencoder_config=None,
    autoencoder_epochs: int = 30,
    autoencoder_batch_size: int | None = None,
    code_config=None,
    autoencoder=None,
    batch_size: int = 1024,
    progress: bool = True,
    device: str = "cpu",
) -> TokenizationResult:
    """Train a tokenization of a weight dataset and tokenise it; with ``out_dir``, write both (module doc).

    Args:
        dataset: a weight dataset (`build_nef_dataset`, `load_nef_dataset`): its `SirenSpec` and shared init
            come from its metadata.
        strategy: ``"vq"`` (`NefVQTokenizer`, ``input_ids``), ``"naive"`` (continuous chunks of ``w - w_init``,
            ``chunks``), ``"learned"`` (`NefAutoencoder` latents, ``chunks``) or ``"code"`` (`NefCodeVAE` codes of
            those latents, ``chunks``: ``code_config.draws`` posterior draws per field, ``index`` repeating).
        vq_config: ``vq`` settings (default `VQTokenizerConfig()`).
        chunking: ``naive`` only: ``"neuron"`` or ``"scalar"`` chunks.
        autoencoder_config, autoencoder_epochs, autoencoder_batch_size: ``learned`` only (`NefAutoencoderConfig`,
            epochs, fields per step; None: 16 for occupancy fields, 64 for images); ``code`` trains such an
            autoencoder first unless ``autoencoder`` (a trained `NefAutoencoder` of the same spec) is given.
        code_config: ``code`` only: `NefCodeConfig` (default `NefCodeConfig()`).
        batch_size: fields encoded at once.
        device: where the ``learned`` autoencoder trains (``"cuda"``: minutes instead of tens of minutes for
            thousands of fields); the other strategies and the saved files are on the CPU.
    """
    from datasets import Dataset, List, Value

    from ..data.metadata import get_shared_init, get_source_info, get_spec, weights_tensor

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    spec, shared_init, source = get_spec(dataset), get_shared_init(dataset), get_source_info(dataset)
    if len(dataset) == 0:
        raise ValueError("the weight dataset is empty: nothing to tokenise")
    weights = weights_tensor(dataset)
    info: dict = {"strategy": strategy, "spec": spec.to_dict(), "num_fields": len(dataset),
                  "shared_init": shared_init is not None}
    if strategy == "vq":
        vq_config = vq_config or VQTokenizerConfig()
        tokenizer, stats = train_vq_tokenizer(weights, spec, shared_init, vq_config, progress=progress)
        ids = tokenizer.encode_weights(weights, spec=spec, batch_size=batch_size)
        usage = codebook_usage(tokenizer, ids)
        info.update(settings=vq_config.to_dict(), tokens_per_field=tokenizer.tokens_per_field,
                    sequence_length=tokenizer.sequence_length, vocab_size=tokenizer.vocab_size, **stats, **usage)
        length = ids.shape[1]
        tokenised = Dataset.from_dict({"input_ids": ids.numpy(), "label": dataset["label"], "index": dataset["index"]})
        tokenised = tokenised.cast_column("input_ids", List(Value("int32"), length=length))
    elif strategy == "naive":
        tokenizer = NeuronChunker(spec, shared_init, chunking)
        chunks = torch.cat([tokenizer.to_chunks(weights[s:s + batch_size]) for s in range(0, len(weights), batch_size)])
        info.update(settings={"chunking": chunking}, tokens_per_field=tokenizer.num_chunks,
                    chunk_width=tokenizer.chunk_width)
        tokenised = _chunks_dataset(chunks, dataset)
    elif strategy == "code":
        from .code import NefCodeConfig, posterior_draws, train_code_vae

        if autoencoder is None:
            autoencoder = train_tokenizer(dataset, "learned", autoencoder_config=autoencoder_config,
                                          autoencoder_epochs=autoencoder_epochs,
                                          autoencoder_batch_size=autoencoder_batch_size, batch_size=batch_size,
                                          progress=progress, device=device).tokenizer
        elif autoencoder.spec != spec:
            raise ValueError(f"the autoencoder decodes {autoencoder.spec} but the weight dataset holds {spec}")
        code_config = code_config or NefCodeConfig()
        kind = source.get("kind") or ("occupancy" if spec.in_dim == 3 else "image")
        tokenizer, stats = train_code_vae(autoencoder, weights, kind, code_config, progress=progress)
        codes = posterior_draws(tokenizer, weights, code_config.draws, seed=code_config.seed)
        rounds = max(code_config.draws, 1)
        info.update(settings=asdict(code_config), autoencoder_settings=asdict(autoencoder.config),
                    tokens_per_field=tokenizer.num_tokens, chunk_width=tokenizer.chunk_width,
                    rows_per_field=rounds, **stats)
        tokenised = _chunks_dataset(codes, {"label": list(dataset["label"]) * rounds,
                                            "index": list(dataset["index"]) * rounds})
    else:
        from .learned import NefAutoencoderConfig, train_autoencoder

        occupancy = source.get("kind") == "occupancy"
        defaults = autoencoder_defaults(source.get("kind"))
        config = autoencoder_config or NefAutoencoderConfig(spec=spec.to_dict(), function_loss=defaults["function_loss"])
        coords, points = field_coords(source, spec), {}
        if occupancy:
            coords = field_coords(source, spec, num_points=SHAPE_AUTOENCODER_POOL)
            points = {"points_per_step": SHAPE_AUTOENCODER_POINTS, "surface_fraction": SHAPE_AUTOENCODER_SURFACE}
        if autoencoder_batch_size is None:
            autoencoder_batch_size = defaults["batch_size"]
        tokenizer, stats = train_autoencoder(weights, spec, shared_init, coords, config, epochs=autoencoder_epochs,
                                             batch_size=autoencoder_batch_size, progress=progress, device=device,
                                             **points)
        with torch.no_grad():
            latents = torch.cat([tokenizer.encode(weights[s:s + batch_size]) for s in range(0, len(weights), batch_size)])
        info.update(settings=asdict(config), epochs=autoencoder_epochs, batch_size=autoencoder_batch_size, **points, tokens_per_field=tokenizer.num_tokens,
                    latent_dim=config.latent_dim, **stats)
        tokenised = _chunks_dataset(latents, dataset)
    # The tokenised set keeps the weight dataset's metadata (spec, shared init, source), so that a model trained
    # on it knows how to rebuild and render its fields (examples/train.py copies spec and source into its config).
    tokenised.info.description = dataset.info.description
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out_dir / "tokenizer")
        tokenised.save_to_disk(str(out_dir / "dataset"))
        (out_dir / "tokenize.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    return TokenizationResult(strategy, tokenizer, tokenised, info)


def load_tokenization(directory: str | os.PathLike):
    """The tokenizer of a `train_tokenizer` output folder (or of its ``tokenizer/`` folder), by strategy."""
    directory = Path(directory)
    folder = directory / "tokenizer" if (directory / "tokenizer").is_dir() else directory
    if (folder / "codebook.safetensors").is_file() or (folder / "tokenizer_config.json").is_file():
        from .tokenization_nef_vq import NefVQTokenizer

        return NefVQTokenizer.from_pretrained(folder)
    if (folder / "chunker_config.json").is_file():
        return NeuronChunker.from_pretrained(folder)
    if (folder / "config.json").is_file():
        from .learned import NefAutoencoder

        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type == "nef_code_vae":
            from .code import NefCodeVAE

            return NefCodeVAE.from_pretrained(folder)
        if model_type != "nef_autoencoder":
            raise FileNotFoundError(f"{folder} holds a {model_type!r} model, not a tokenizer: a NefGPT folder keeps its "
                                    f"VQ tokenizer next to config.json and a chunker or autoencoder in tokenizer/")
        return NefAutoencoder.from_pretrained(folder)
    raise FileNotFoundError(f"{directory} holds no tokenizer (expected tokenizer_config.json + codebook.safetensors, "
                            f"chunker_config.json or a NefAutoencoder's or NefCodeVAE's config.json)")


__all__ = [
    "COMPACT_VQ_CONFIG", "NORMALIZATIONS", "STRATEGIES", "TokenizationResult", "VQTokenizerConfig",
    "autoencoder_defaults", "chunk_scale", "codebook_usage", "field_coords", "load_tokenization", "train_tokenizer",
    "train_vq_tokenizer",
]
