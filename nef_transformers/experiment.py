"""End-to-end runs, stage by stage and resumable: split -> fit -> tokenize -> train -> sample -> evaluate.

`nef-transformers quickstart` runs one strategy and one sampling setting; ``benchmarks/generation_quality.py``
runs several strategies over a top-k x temperature grid, with oracle and baseline rows. Both drive a `Run`.

Folder layout (``OUT``)::

    run.json                    identity: source, split, settings, package version (another run's folder is refused)
    fields/                     fit of the training items (`fit_to_disk`, resumable shards; OUT/fields/dataset)
    heldout_fields/             the held-out items fitted alike, only when asked (`Run.reconstruction_row`)
    reference/                  real items as .npy (test and training images or point clouds), the feature net
    {strategy}/tokenization/    `train_tokenizer` output (tokenizer/, dataset/, tokenize.json)
    {strategy}/model/           the trained NefGPT: pipeline("neural-field-generation", model=...) loads it
    {strategy}/samples/k{K}_t{T}.safetensors   generated weights of one sampling setting
    code/tuned/                 the code strategy's generator with decoders tuned to NefGPT's draws, only when asked
                                (`Run.tune_decoders`; a generation folder like code/model)

Each stage is skipped when its output is complete, and every output is written to a temporary name then
renamed, so Ctrl-C leaves either nothing or a finished stage; training resumes from its last checkpoint.

Splits: a seeded permutation of the source (``split_seed``); MNIST's embedded 5,000 digits give 4,000 / 1,000,
ModelNet10's 889 chairs 711 / 178 (``test_fraction`` 0.2). Only training items are fitted: generated fields are
compared with the real held-out items (images, or point clouds sampled from the real shapes), as in
HyperDiffusion. The held-out items are fitted only for one diagnostic, `Run.reconstruction_row` (does the
autoencoder reconstruct fields it has not seen?); nothing trains on them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .models.nef_gpt.configuration_nef_gpt import MIXTURE_COVARIANCES

logger = logging.getLogger(__name__)

RUN_FORMAT = 1
STRATEGIES = ("naive", "vq", "learned", "code")
NUM_POINTS = 2048  # points per cloud for the shape metrics (HyperDiffusion)
MESH_RESOLUTION = 64  # marching-cubes lattice of generated shapes
RECONSTRUCTION_RESOLUTION = 48  # occupancy lattice on which `reconstruction_row` compares shapes
# Refuse to start below this much free disk: the MNIST quickstart writes ~150 MiB (fields, checkpoints, samples).
MIN_FREE_BYTES = 256 * 2**20


class RunMismatchError(ValueError):
    """The output folder holds a run of another source, split or settings."""


@dataclass
class RunConfig:
    """What a run is: the source, the split, the fields, the tokenization and the model (see the module doc).

    ``None`` values mean the source's defaults (`default_spec`, `default_fit_config`).
    """

    source: str = "mnist"
    # items of the source used (a seeded subset), then split; None: all of them
    num_items: int | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    # fitting
    fit_steps: int | None = None
    fit_batch_size: int | None = None
    # tokenization (vq: NefVQTokenizer, one token per weight; naive: continuous per-neuron chunks)
    strategy: str = "naive"
    # NefGPT and its training (nef_transformers.training options)
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_mixtures: int = 8
    # each mixture component's covariance over a chunk ("diagonal" or "full"; continuous strategies only)
    mixture_covariance: str = "diagonal"
    # hidden and attention dropout of NefGPT (`--dropout`): a prior over a few hundred fields overfits
    dropout: float = 0.0
    # noise on NefGPT's training chunks, in units of their std (`--chunk_noise`; continuous strategies only)
    chunk_noise: float = 0.0
    # learned strategy: the neuron autoencoder (`NefAutoencoderConfig`) trained before NefGPT models its latents
    autoencoder_epochs: int = 30
    autoencoder_hidden_size: int = 64
    autoencoder_layers: int = 2
    autoencoder_latent_dim: int = 4
    autoencoder_batch_size: int | None = None  # None: 16 for shapes, 64 for images (`train_tokenizer`)
    autoencoder_latent_noise: float = 0.0  # `NefAutoencoderConfig.latent_noise`
    # what the autoencoder's encoder reads: "function" (the field on a lattice, a CNN; the default since it beat the
    # neuron encoder on MNIST and in the quickstart, benchmarks/RESULTS.md session 17) or "weights" (the neurons;
    # `NefAutoencoderConfig.encoder`)
    autoencoder_encoder: str = "function"
    # code strategy: a VAE over the learned strategy's latents (`NefCodeConfig`); NefGPT models its codes
    code_dim: int = 32
    code_chunk_width: int = 4
    code_sigma2: float = 0.3
    code_steps: int = 4000
    code_draws: int = 8
    code_drop_inactive: bool = False  # NefGPT models only the code dimensions in use
    batch_size: int = 32
    learning_rate: float = 1e-3
    num_train_epochs: int = 30
    max_train_steps: int | None = None
    class_conditional: bool = False
    # keep the weights of the lowest validation loss (`--keep_best_model`): large NefGPTs overfit 4,000 fields
    keep_best_model: bool = False
    # validation loss every this many NefGPT steps (with keep_best_model: the steps the best weights come from)
    eval_steps: int = 200
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mixture_covariance not in MIXTURE_COVARIANCES:
            raise ValueError(f"mixture_covariance must be {' or '.join(map(repr, MIXTURE_COVARIANCES))}, got "
                             f"{self.mixture_covariance!r}")
        if not self.chunk_noise >= 0:
            raise ValueError(f"chunk_noise must be >= 0, got {self.chunk_noise}")
        if isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int) or self.eval_steps < 1:
            raise ValueError(f"eval_steps must be an int >= 1, got {self.eval_steps!r}")
        from .tokenization.learned import ENCODERS

        if self.autoencoder_encoder not in ENCODERS:
            raise ValueError(f"autoencoder_encoder must be one of {ENCODERS}, got {self.autoencoder_encoder!r}")

    def stage_settings(self, strategy: str) -> dict:
        """The settings a strategy's cached tokenization and model were made with (compared on reuse)."""
        tokenization = {}
        if strategy in ("learned", "code"):
            tokenization = {"epochs": self.autoencoder_epochs, "hidden_size": self.autoencoder_hidden_size,
                            "num_layers": self.autoencoder_layers, "latent_dim": self.autoencoder_latent_dim,
                            "latent_noise": self.autoencoder_latent_noise, "encoder": self.autoencoder_encoder}
        if strategy == "code":  # the autoencoder's settings, then the VAE's
            tokenization = {**{f"autoencoder_{k}": v for k, v in tokenization.items()}, **self.code_config().__dict__}
        model = {"hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
                 "num_attention_heads": self.num_attention_heads, "hidden_dropout": self.dropout}
        if strategy != "vq":  # the regression head's mixture
            model["num_mixtures"] = self.num_mixtures
            model["mixture_covariance"] = self.mixture_covariance
        return {"tokenization": tokenization, "model": model}

    def code_config(self):
        """The code strategy's `NefCodeConfig`."""
        from .tokenization.code import NefCodeConfig

        return NefCodeConfig(code_dim=self.code_dim, chunk_width=self.code_chunk_width, sigma2=self.code_sigma2,
                             steps=self.code_steps, draws=self.code_draws, drop_inactive=self.code_drop_inactive,
                             seed=self.seed)

    def identity(self) -> dict:
        """The settings that make outputs incomparable when they change (run.json)."""
        return {"source": str(self.source), "num_items": self.num_items, "test_fraction": self.test_fraction,
                "split_seed": self.split_seed, "fit_steps": self.fit_steps, "fit_batch_size": self.fit_batch_size}


PRIOR_SEED = 10_000  # `Run.tune_decoders` draws its prior codes with seeds from here up: never an evaluation seed


@dataclass
class DecoderTuning:
    """Settings of `Run.tune_decoders` (`tune_decoder_to_prior`'s; the defaults are session 17's chair run)."""

    prior_codes: int = 10_000  # NefGPT draws the decoders are tuned to
    epochs: int = 20  # passes over the training fields
    cycle_weight: float = 0.1
    mmd_weight: float = 1.0  # the realism term (0: the cycle term alone, session 16)
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0  # the tuning's batches and posterior draws

    def __post_init__(self):
        if self.prior_codes < 1:
            raise ValueError(f"prior_codes must be >= 1, got {self.prior_codes}")

    def settings(self, top_k: int | None, temperature: float) -> dict:
        """What tune.json records and a reuse compares: every setting, the prior's top-k and temperature too."""
        return {"prior_codes": self.prior_codes, "top_k": top_k, "temperature": temperature, "epochs": self.epochs,
                "cycle_weight": self.cycle_weight, "mmd_weight": self.mmd_weight, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed}


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes (None when there is no file): which model drew a cached sample, or was scored."""
    import hashlib

    if not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def check_output_folder(out: Path, identity: dict, fresh: bool = False) -> str:
    """Create or reuse ``out``: ``"new"``, ``"resumed"``, or ``"restarted"`` (``fresh``: wipe a previous run).

    A folder from another run (other source, split or fit settings) is refused with the differences listed; a
    non-empty folder that is not a run is refused. A folder that cannot be written fails here, before any work.
    """
    from . import __version__
    from .data.weights import _atomic_write_text, check_writable

    out = Path(out)
    marker = out / "run.json"
    state = "new"
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        if marker.is_file():
            if fresh:
                shutil.rmtree(out)
                state = "restarted"
            else:
                saved = json.loads(marker.read_text(encoding="utf-8"))
                differences = [f"{k}: folder has {saved['identity'].get(k)!r}, now {v!r}"
                               for k, v in identity.items() if saved["identity"].get(k) != v]
                if saved.get("format") != RUN_FORMAT:
                    differences.append(f"run format {saved.get('format')} (this version writes {RUN_FORMAT})")
                if saved.get("version") != __version__:
                    differences.append(f"written by nef_transformers {saved.get('version')}, this is {__version__}")
                if differences:
                    raise RunMismatchError(
                        f"{out} holds another run ({'; '.join(differences)}): pass --fresh to delete it and start "
                        f"again, or choose another --out")
                state = "resumed"
        elif any(out.iterdir()):
            raise RunMismatchError(f"{out} is not empty and holds no run.json: choose an empty or new folder")
    check_writable(out)
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise OSError(f"only {free / 2**20:.0f} MiB free on the disk of {out}; a run needs at least "
                      f"{MIN_FREE_BYTES / 2**20:.0f} MiB (fields, tokenizer, checkpoints): free some space or choose "
                      f"another --out")
    if state != "resumed":
        payload = {"format": RUN_FORMAT, "identity": identity, "version": __version__}
        _atomic_write_text(marker, json.dumps(payload, indent=2, sort_keys=True))
    return state


def _check_cached(folder: Path, saved: dict, wanted: dict) -> None:
    """Refuse to reuse a stage made with other settings (it would silently stand in for the one asked for)."""
    differences = [f"{key}: {saved.get(key)!r} there, {value!r} asked" for key, value in wanted.items()
                   if saved.get(key) != value]
    if differences:
        raise RunMismatchError(f"{folder} was made with other settings ({'; '.join(differences)}): ask for the "
                               f"settings it was made with, delete it, pass --fresh, or choose another --out")


def subset_source(source, indices: Sequence[int]):
    """The items ``indices`` of a source as a source of its own (same normalisation and class names)."""
    from .data.images import ImageSource
    from .data.shapes import VoxelGridSource

    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(source, ImageSource):
        return ImageSource(source.images[indices], source.labels[indices], name=source.name, mean=source.mean,
                           std=source.std, class_names=list(source.class_names))
    if isinstance(source, VoxelGridSource):
        return VoxelGridSource(source.voxels[indices], source.labels[indices], name=source.name,
                               class_names=list(source.class_names), fill=False)
    if hasattr(source, "files"):  # MeshFolderSource
        part = copy.copy(source)
        part.files = [source.files[i] for i in indices]
        part.labels = source.labels[indices]
        part._digests = {}
        return part
    raise TypeError(f"cannot take a subset of a {type(source).__name__}")


def split_indices(num_items: int, test_fraction: float, seed: int, subset: int | None = None):
    """A seeded permutation (its first ``subset`` items when given) cut into (train, test) index arrays, sorted."""
    order = np.random.default_rng(seed).permutation(num_items)
    if subset is not None:
        if subset > num_items:
            raise ValueError(f"--num-items {subset} is more than the source has ({num_items} items)")
        order = order[:subset]
    num_items = len(order)
    if num_items < 4:
        raise ValueError(f"need at least 4 items to split into training and test sets, got {num_items}")
    num_test = max(2, int(round(test_fraction * num_items)))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


# ------------------------------------------------------------------------------------------------ real items
def real_images(source, indices) -> np.ndarray:
    """``(b, H, W, C)`` float32 images in [0, 1]."""
    images = source.images[np.asarray(indices)]
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def real_point_clouds(source, indices, num_points: int = NUM_POINTS, seed: int = 0, progress: bool = True) -> np.ndarray:
    """``(b, num_points, 3)`` points on the real shapes: the voxel grids' marching-cubes surfaces, or the meshes."""
    from tqdm.auto import tqdm

    from .data.shapes import load_normalized_mesh, sample_surface
    from .fields.render import extract_mesh, sample_point_cloud

    clouds = []
    for n, i in enumerate(tqdm(list(indices), desc="real point clouds", disable=not progress)):
        if hasattr(source, "voxels"):
            grid = np.pad(source.voxels[i].astype(np.float32), 1)
            resolution = grid.shape[0]
            # voxel centres span [-0.5 + h/2, 0.5 - h/2]; with the padding the lattice spans one cell more
            bound = 0.5 + 0.5 / source.resolution
            mesh = extract_mesh(grid, level=0.5, bound=bound * (resolution - 1) / resolution)
            clouds.append(sample_point_cloud(mesh, num_points, seed + n))
        else:
            vertices, faces = load_normalized_mesh(source.files[i])
            clouds.append(sample_surface(vertices, faces, num_points, np.random.default_rng(seed + n)).astype(np.float32))
    return np.stack(clouds)


def render_items(kind: str, spec, weights: torch.Tensor, source_info: dict, device="cpu", seed: int = 0,
                 progress: bool = True) -> tuple[list, np.ndarray]:
    """Generated weights -> items for the metrics: images, or point clouds. Returns ``(items, valid)`` where
    invalid rows (NaN/inf weights, fields that render empty) are None and counted by the caller."""
    from tqdm.auto import tqdm

    from .fields.render import render_images, render_meshes, sample_point_cloud

    weights = weights.float()
    finite = torch.isfinite(weights).all(1).cpu().numpy()
    items: list = [None] * len(weights)
    rows = np.flatnonzero(finite)
    if kind == "image":
        for start in range(0, len(rows), 256):
            part = rows[start:start + 256]
            images = render_images(spec, weights[part].to(device), source_info["image_shape"], source_info["mean"],
                                   source_info["std"])
            for r, image in zip(part, images):
                items[r] = image
    else:
        for start in tqdm(range(0, len(rows), 16), desc="meshing samples", disable=not progress):
            part = rows[start:start + 16]
            for r, mesh in zip(part, render_meshes(spec, weights[part].to(device), MESH_RESOLUTION)):
                if mesh is not None and len(mesh.faces) > 0:
                    items[r] = sample_point_cloud(mesh, NUM_POINTS, seed + int(r))
    valid = np.array([item is not None for item in items])
    return items, valid


# ------------------------------------------------------------------------------------------------ baselines
def noisy_weights(train_weights: torch.Tensor, count: int, scale: float, seed: int) -> torch.Tensor:
    """``count`` training fields plus Gaussian noise of ``scale`` x each parameter's std over the training set."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train_weights), generator=generator)[:count]
    std = train_weights.std(0, keepdim=True)
    return train_weights[rows] + scale * std * torch.randn(len(rows), train_weights.shape[1], generator=generator)


def gaussian_weights(train_weights: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` draws from one Gaussian fitted to the training weights (mean and full covariance, float64)."""
    data = train_weights.double()
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / max(1, len(data) - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, data.shape[1], generator=generator, dtype=torch.float64)
    return (mean + noise @ factor.T).float()


@torch.no_grad()
def _in_latent_space(autoencoder, train_weights: torch.Tensor, draw, batch_size: int, return_latents: bool):
    """Encode ``train_weights``, ``draw(flat_latents)`` new flat latents, decode them (float32 CPU weights; with
    ``return_latents``, ``(weights, drawn latents)``)."""
    device = autoencoder.scale.device
    latents = torch.cat([autoencoder.encode(part.to(device).float()).cpu() for part in train_weights.split(batch_size)])
    draws = draw(latents.flatten(1))
    draws = draws.view(len(draws), *latents.shape[1:])
    weights = torch.cat([autoencoder.decode(part.to(device)).float().cpu() for part in draws.split(batch_size)])
    return (weights, draws) if return_latents else weights


def latent_gaussian_weights(autoencoder, train_weights: torch.Tensor, count: int, seed: int,
                            batch_size: int = 256, return_latents: bool = False):
    """``count`` fields decoded from one Gaussian fitted to the ``autoencoder``'s latents of ``train_weights``
    (`gaussian_weights` over the flattened ``(t, latent_dim)`` latents), as float32 CPU weights (with
    ``return_latents``, ``(weights, latents)``)."""
    return _in_latent_space(autoencoder, train_weights, lambda flat: gaussian_weights(flat, count, seed), batch_size,
                            return_latents)


def latent_noisy_weights(autoencoder, train_weights: torch.Tensor, count: int, scale: float, seed: int,
                         batch_size: int = 256, return_latents: bool = False):
    """``count`` training fields whose ``autoencoder`` latents get noise of ``scale`` x each latent entry's std
    (`noisy_weights` over the flattened latents), decoded: near copies of training fields, as float32 CPU weights
    (with ``return_latents``, ``(weights, latents)``)."""
    return _in_latent_space(autoencoder, train_weights, lambda flat: noisy_weights(flat, count, scale, seed),
                            batch_size, return_latents)


def nearest_distances(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False, block: int = 2048) -> np.ndarray:
    """Each row of ``a``'s L2 distance to its nearest row of ``b`` (``b`` is ``a`` and row i not its own neighbour
    with ``exclude_self``), in blocks of ``block`` rows: ``(len(a),)``."""
    found = []
    for start in range(0, len(a), block):
        distances = torch.cdist(a[start:start + block], b)
        if exclude_self:
            rows = torch.arange(len(distances))
            distances[rows, rows + start] = float("inf")
        found.append(distances.min(1).values)
    return torch.cat(found).numpy()


# ------------------------------------------------------------------------------------------------ reconstruction
PSNR_CAP_DB = 100.0  # identical renderings: PSNR is infinite; reported as this cap (MSE floored at 1e-10)


@torch.no_grad()
def field_renderings(kind: str, spec, weights: torch.Tensor, source_info: dict, device="cpu",
                     batch_size: int = 16) -> torch.Tensor:
    """What `reconstruction_row` compares, one row per field: for ``kind`` ``"occupancy"``, the occupancy (logit >
    0) on a `RECONSTRUCTION_RESOLUTION`³ lattice, ``(b, r³)`` bool; for images, the rendered pixels in [0, 1],
    ``(b, H·W·C)`` float."""
    from .fields.render import occupancy_grid, render_images

    parts = []
    for start in range(0, len(weights), batch_size):
        chunk = weights[start:start + batch_size].float().to(device)
        if kind == "occupancy":
            parts.append((occupancy_grid(spec, chunk, RECONSTRUCTION_RESOLUTION) > 0).flatten(1).cpu())
        else:
            images = render_images(spec, chunk, source_info["image_shape"], source_info["mean"], source_info["std"])
            parts.append(torch.as_tensor(images).flatten(1).float())
    return torch.cat(parts)


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))


def _iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))  # two empty shapes: 1


def _scores(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairs: ``(len(a), len(b))`` IoU of bool rows (two empty rows: 1) or PSNR in dB of [0, 1] rows."""
    if kind == "occupancy":
        a, b = a.float(), b.float()
        inter = a @ b.T
        return _iou(inter, a.sum(1, keepdim=True) + b.sum(1)[None] - inter)
    a, b = a.double(), b.double()  # |a|² + |b|² - 2ab: float64 keeps identical rows at ~1e-16, under the cap
    mse = ((a ** 2).sum(1, keepdim=True) + (b ** 2).sum(1)[None] - 2 * a @ b.T).clamp_min(0) / a.shape[1]
    return _psnr(mse).float()


def paired_scores(kind: str, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row i of ``a`` against row i of ``b`` (`field_renderings`): IoU for ``"occupancy"`` (two empty rows: 1),
    else PSNR (dB, capped at `PSNR_CAP_DB`)."""
    if a.shape != b.shape:
        raise ValueError(f"paired renderings must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if kind == "occupancy":
        return _iou((a & b).sum(1).float(), (a | b).sum(1).float()).numpy()
    return _psnr(((a.double() - b.double()) ** 2).mean(1)).float().numpy()


def nearest_scores(kind: str, queries: torch.Tensor, pool: torch.Tensor, block: int = 256) -> np.ndarray:
    """Each query's best score (`paired_scores`' measure) against any row of ``pool``: what returning the most
    alike pool item would reach, in blocks of ``block`` queries."""
    if len(pool) == 0:
        raise ValueError("nearest_scores needs a non-empty pool")
    pool = pool.float() if kind == "occupancy" else pool
    return torch.cat([_scores(kind, queries[s:s + block], pool).max(1).values
                      for s in range(0, len(queries), block)]).numpy()


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """One experiment folder (module doc). Stages are methods; each returns its result and skips finished work."""

    out: Path
    config: RunConfig = field(default_factory=RunConfig)
    device: str | None = None
    progress: bool = True
    fresh: bool = False
    state: str = field(init=False, default="new")

    def __post_init__(self):
        self.out = Path(self.out)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.state = check_output_folder(self.out, self.config.identity(), self.fresh)
        self._source = None
        self._split = None
        self._fields = None
        self._heldout_fields = None
        self._train_latents = None  # the training fields' autoencoder latents (`latent_nn_ratio`)

    # -------------------------------------------------------------------------------------- data
    @property
    def source(self):
        if self._source is None:
            from .data.sources import load_source

            self._source = load_source(self.config.source)
        return self._source

    @property
    def kind(self) -> str:
        return "image" if self.source.kind == "image" else "points"

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        if self._split is None:
            self._split = split_indices(len(self.source), self.config.test_fraction, self.config.split_seed,
                                        self.config.num_items)
        return self._split

    def _fit_items(self, indices, folder: str):
        """Items ``indices`` of the source fitted to fields in OUT/``folder`` (`fit_to_disk`: resumable), with the
        run's fitting settings: every call fits alike, from the same shared initialisation."""
        from .data.sources import default_fit_config, default_spec
        from .data.weights import fit_to_disk

        config = default_fit_config(self.source, steps=self.config.fit_steps, batch_size=self.config.fit_batch_size,
                                    seed=self.config.seed)
        return fit_to_disk(subset_source(self.source, indices), self.out / folder, spec=default_spec(self.source),
                           config=config, device=self.device, progress=self.progress)

    def fit(self):
        """The training items fitted to fields: a weight dataset (OUT/fields/dataset)."""
        if self._fields is None:
            self._fields = self._fit_items(self.split()[0], "fields")
        return self._fields

    def heldout_fields(self):
        """The held-out items fitted to fields exactly as the training items were (same settings, same shared
        initialisation; OUT/heldout_fields/dataset, resumable). Only `reconstruction_row` reads them: no stage trains
        on them, and generated fields are still compared with the real held-out items."""
        if self._heldout_fields is not None:
            return self._heldout_fields
        from .data.metadata import get_shared_init

        train_fields = self.fit()
        fields = self._fit_items(self.split()[1], "heldout_fields")
        mine, theirs = get_shared_init(fields), get_shared_init(train_fields)
        if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine, theirs)):
            raise RunMismatchError(f"{self.out / 'heldout_fields'} was fitted from another shared initialisation than "
                                   f"{self.out / 'fields'}: delete it to refit")
        self._heldout_fields = fields
        return fields

    def reconstruction_row(self, strategy: str | None = None, seed: int = 0, code_vae=None) -> dict:
        """Does the tokenization's autoencoder generalise? Its reconstructions of as many training fields as held-out
        items (the oracle's seeded choice) and of every held-out field (`heldout_fields`), each against the field
        itself (shapes: IoU of the occupancy on a 48³ lattice; images: PSNR in dB of the rendered pixels), and
        ``retrieval``: each held-out field against its most alike training field (an autoencoder that only
        memorised its training set could at best return that). For the ``"learned"`` strategy (the autoencoder)
        and ``"code"`` (its code VAE, through the posterior means; ``code_vae``: another `NefCodeVAE` over the same
        autoencoder's codes, e.g. one whose decoders `tune_decoder_to_prior` tuned). Returns ``{"strategy":
        "reconstruction-<strategy>", "measure": "iou" | "psnr_db", "train", "heldout", "retrieval" (means),
        "num_train", "num_heldout"}``."""
        from .data.metadata import get_source_info, get_spec, weights_tensor

        strategy = strategy or self.config.strategy
        if code_vae is not None and strategy != "code":
            raise ValueError(f"code_vae is a code-strategy model; reconstruction_row({strategy!r}) does not use one")
        if strategy not in ("learned", "code"):
            raise ValueError(f"reconstruction_row measures the autoencoders of the 'learned' and 'code' strategies; "
                             f"{strategy!r} reconstructs {'exactly' if strategy == 'naive' else 'through its codebook'}")
        train_fields = self.fit()
        spec, info = get_spec(train_fields), get_source_info(train_fields)
        kind = "occupancy" if self.source.kind != "image" else "image"
        train = weights_tensor(train_fields)
        heldout = weights_tensor(self.heldout_fields())
        if strategy == "learned":
            autoencoder = self._autoencoder()

            def reconstruct(weights):
                return autoencoder(weights.to(self.device))[0].float().cpu()
        else:
            vae = self.code_vae() if code_vae is None else code_vae.to(self.device).eval()

            def reconstruct(weights):
                codes = vae.encode(weights.to(self.device))
                return vae.autoencoder.decode(vae.decode_latents(codes)).float().cpu()

        def render(weights):
            return field_renderings(kind, spec, weights, info, self.device)

        scores = {}
        for name, weights in (("train", self._oracle_weights(seed)), ("heldout", heldout)):
            with torch.no_grad():
                decoded = torch.cat([reconstruct(part) for part in weights.split(256)])
            scores[name] = paired_scores(kind, render(weights), render(decoded))
        retrieval = nearest_scores(kind, render(heldout), render(train))
        return {"strategy": f"reconstruction-{strategy}", "measure": "iou" if kind == "occupancy" else "psnr_db",
                "train": float(scores["train"].mean()), "heldout": float(scores["heldout"].mean()),
                "retrieval": float(retrieval.mean()), "num_train": len(scores["train"]),
                "num_heldout": len(scores["heldout"])}

    def reference(self, which: str) -> np.ndarray:
        """Real items of the ``"train"`` or ``"test"`` split (images or point clouds), cached as .npy."""
        folder = self.out / "reference"
        folder.mkdir(exist_ok=True)
        path = folder / f"{which}_{self.kind}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        train, test = self.split()
        indices = train if which == "train" else test
        if self.kind == "image":
            items = real_images(self.source, indices)
        else:
            items = real_point_clouds(self.source, indices, seed=0 if which == "train" else 10**6,
                                      progress=self.progress)
        _atomic_npy(path, items)
        return items

    def labels(self, which: str) -> np.ndarray:
        train, test = self.split()
        return np.asarray(self.source.labels)[train if which == "train" else test]

    def feature_net(self):
        """The classifier whose features give the Fréchet distance (trained once on the training split), or None
        when the source has a single class (nothing to train it on)."""
        from .metrics import ImageFeatureNet, PointNetFeatureNet, load_feature_net, train_feature_net

        folder = self.out / "reference" / "feature_net"
        if (folder / "config.json").is_file():
            return load_feature_net(folder)
        labels = self.labels("train")
        num_classes = int(labels.max()) + 1
        if num_classes < 2:
            return None
        items = self.reference("train")
        torch.manual_seed(self.config.seed)
        if self.kind == "image":
            net = ImageFeatureNet(image_shape=items.shape[1:], num_classes=num_classes)
            train_feature_net(net, items, labels, device=self.device, progress=self.progress)
        else:
            net = PointNetFeatureNet(num_classes=num_classes)
            train_feature_net(net, items, labels, epochs=20, device=self.device, progress=self.progress)
        tmp = folder.with_name("feature_net.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        net.save(tmp)
        os.replace(tmp, folder)
        return load_feature_net(folder)

    # -------------------------------------------------------------------------------------- stages
    def strategy_dir(self, strategy: str | None = None) -> Path:
        return self.out / (strategy or self.config.strategy)

    def tokenize(self, strategy: str | None = None):
        """Train the tokenization on the fitted training fields (OUT/{strategy}/tokenization)."""
        from .tokenization.train import train_tokenizer

        strategy = strategy or self.config.strategy
        folder = self.strategy_dir(strategy) / "tokenization"
        wanted = self.config.stage_settings(strategy)["tokenization"]
        if strategy == "learned":
            wanted["function_loss"] = self._function_loss()
            wanted["batch_size"] = self._autoencoder_batch_size()
        if strategy == "code":
            return self._tokenize_code(folder, wanted)
        if (folder / "tokenize.json").is_file():
            info = json.loads((folder / "tokenize.json").read_text(encoding="utf-8"))
            # older folders: the MSE was the only loss, 64 the only batch, no latent noise
            settings = {"function_loss": "mse", "latent_noise": 0.0, "encoder": "weights", **info.get("settings", {}),
                        "epochs": info.get("epochs"), "batch_size": info.get("batch_size", 64)}
            saved = {k: settings.get(k) for k in wanted}
            _check_cached(folder, saved, wanted)
            return folder
        dataset = self.fit()
        tmp = folder.with_name("tokenization.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        autoencoder_config = None
        if strategy == "learned":
            from .data.metadata import get_spec
            from .tokenization.learned import NefAutoencoderConfig

            c = self.config
            autoencoder_config = NefAutoencoderConfig(
                spec=get_spec(dataset).to_dict(), latent_dim=c.autoencoder_latent_dim,
                hidden_size=c.autoencoder_hidden_size, num_layers=c.autoencoder_layers,
                function_loss=self._function_loss(), latent_noise=c.autoencoder_latent_noise,
                encoder=c.autoencoder_encoder)
        train_tokenizer(dataset, strategy, out_dir=tmp, autoencoder_config=autoencoder_config,
                        autoencoder_epochs=self.config.autoencoder_epochs,
                        autoencoder_batch_size=self._autoencoder_batch_size() if strategy == "learned" else None,
                        progress=self.progress,
                        device=self.device)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    def _tokenize_code(self, folder: Path, wanted: dict) -> Path:
        """The code strategy's tokenization: a `NefCodeVAE` over the learned strategy's autoencoder (trained first
        when missing), its settings kept in tokenize.json's ``run_settings`` to be compared on reuse."""
        from .tokenization.train import train_tokenizer

        wanted = {**wanted, "autoencoder_function_loss": self._function_loss(),
                  "autoencoder_batch_size": self._autoencoder_batch_size()}
        if (folder / "tokenize.json").is_file():
            info = json.loads((folder / "tokenize.json").read_text(encoding="utf-8"))
            # older runs: every dimension, the weights encoder
            saved = {"drop_inactive": False, "autoencoder_encoder": "weights", **info.get("run_settings", {})}
            _check_cached(folder, {k: saved.get(k) for k in wanted}, wanted)
            return folder
        autoencoder = self._autoencoder().cpu()
        tmp = folder.with_name("tokenization.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(self.fit(), "code", out_dir=tmp, autoencoder=autoencoder, code_config=self.config.code_config(),
                        progress=self.progress)
        info = json.loads((tmp / "tokenize.json").read_text(encoding="utf-8"))
        info["run_settings"] = wanted
        (tmp / "tokenize.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    def _function_loss(self) -> str:
        """The learned strategy's autoencoder loss: occupancy KL for shapes, MSE for images."""
        from .tokenization.train import autoencoder_defaults

        return autoencoder_defaults(self.source.kind)["function_loss"]

    def _autoencoder_batch_size(self) -> int:
        from .tokenization.train import autoencoder_defaults

        if self.config.autoencoder_batch_size is not None:
            return self.config.autoencoder_batch_size
        return autoencoder_defaults(self.source.kind)["batch_size"]

    def train(self, strategy: str | None = None, extra_args: Sequence[str] = ()) -> Path:
        """Train NefGPT on the tokenised fields (OUT/{strategy}/model), resuming from its last checkpoint."""
        from accelerate.state import AcceleratorState, GradientState, PartialState

        from . import training

        strategy = strategy or self.config.strategy
        tokenization = self.tokenize(strategy)
        model_dir = self.strategy_dir(strategy) / "model"
        if (model_dir / "config.json").is_file():  # a model made before: with the same sizes?
            wanted = self.config.stage_settings(strategy)["model"]
            saved = {"mixture_covariance": "diagonal",  # models saved before the option had diagonal ones
                     **json.loads((model_dir / "config.json").read_text(encoding="utf-8"))}
            _check_cached(model_dir, {k: saved.get(k) for k in wanted}, wanted)
        chunk_noise = self.config.chunk_noise if strategy != "vq" else 0.0
        if (model_dir / "model.safetensors").is_file() and (model_dir / "trainer_state.json").is_file():
            state = json.loads((model_dir / "trainer_state.json").read_text(encoding="utf-8"))
            _check_cached(model_dir, {"chunk_noise": state.get("chunk_noise", 0.0)}, {"chunk_noise": chunk_noise})
            if state.get("finished"):
                return model_dir
        c = self.config
        argv = ["--dataset", str(tokenization / "dataset"), "--tokenizer", str(tokenization / "tokenizer"),
                "--output_dir", str(model_dir), "--hidden_size", str(c.hidden_size),
                "--num_hidden_layers", str(c.num_hidden_layers), "--num_attention_heads", str(c.num_attention_heads),
                "--num_mixtures", str(c.num_mixtures), "--mixture_covariance", c.mixture_covariance,
                "--dropout", str(c.dropout),
                "--per_device_train_batch_size", str(c.batch_size),
                "--learning_rate", str(c.learning_rate), "--num_train_epochs", str(c.num_train_epochs),
                "--validation_split", "0.05", "--lr_warmup_steps", "50", "--eval_steps", str(c.eval_steps),
                "--checkpointing_steps", "200", "--logging_steps", "10", "--report_to", "none",
                "--seed", str(c.seed), "--chunk_noise", str(chunk_noise), *extra_args]
        if self.device == "cpu":
            argv.append("--cpu")
        if c.max_train_steps:
            argv += ["--max_train_steps", str(c.max_train_steps)]
        if c.class_conditional:
            argv.append("--class_conditional")
        if c.keep_best_model:
            argv.append("--keep_best_model")
        if any((model_dir / "checkpoints").glob("step_*/*")):
            argv += ["--resume_from_checkpoint", "latest"]
        try:
            training.main(argv)
        finally:  # each in-process run builds its own Accelerator
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            PartialState._reset_state()
        return model_dir

    def sample(self, strategy: str | None = None, top_k: int | None = None, temperature: float = 1.0,
               num_samples: int | None = None, seed: int = 0, return_sequences: bool = False):
        """Generated weights ``(num_samples, p)`` (default: as many as test items), cached per setting; with
        ``return_sequences``, ``(weights, sequences)``: also what NefGPT sampled (the learned strategy's latents)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from .pipelines.neural_field_generation import generate_weights, load_generation_folder

        strategy = strategy or self.config.strategy
        num_samples = num_samples or len(self.split()[1])
        folder = self.strategy_dir(strategy) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"k{top_k or 0}_t{temperature:g}_n{num_samples}_s{seed}.safetensors"
        cached = load_file(path) if path.is_file() else {}
        if cached:  # drawn from the model that is there now? (a model trained again draws other samples)
            with safe_open(path, "pt") as saved:
                drawn_by = (saved.metadata() or {}).get("model_sha256")
            current = file_digest(self.strategy_dir(strategy) / "model" / "model.safetensors")
            if current is None or drawn_by not in (None, current):  # older files name no model: kept
                cached = {}
        if "weights" not in cached or (return_sequences and "sequences" not in cached):  # older files: weights only
            model_dir = self.train(strategy)
            model, tokenization = load_generation_folder(model_dir)
            model.to(self.device).eval()
            weights, sequences = generate_weights(model, tokenization, num_samples, top_k=top_k,
                                                  temperature=temperature, seed=seed, progress=self.progress,
                                                  return_sequences=True)
            cached = {"weights": weights.contiguous(), "sequences": sequences.contiguous()}
            tmp = path.with_name(path.name + ".tmp")
            save_file(cached, str(tmp), metadata={"model_sha256": file_digest(model_dir / "model.safetensors")})
            os.replace(tmp, path)
        return (cached["weights"], cached["sequences"]) if return_sequences else cached["weights"]

    def tune_decoders(self, top_k: int | None, temperature: float, tuning: DecoderTuning | None = None,
                      name: str = "tuned") -> Path:
        """The code strategy's generator with decoders tuned to NefGPT's own draws (OUT/code/{name}): NefGPT's
        ``tuning.prior_codes`` codes at ``top_k`` / ``temperature`` (seeds from `PRIOR_SEED` up, never an
        evaluation seed), then `tune_decoder_to_prior` on a copy of the code VAE (the cycle and realism terms;
        the encoders stay fixed, so NefGPT's codes stay valid; RESULTS.md sessions 16 and 17).

        The folder is a generation folder like OUT/code/model, NefGPT's files with the tuned VAE as its
        ``tokenizer/``, so ``pipeline("neural-field-generation", model=folder)`` samples through the tuned decoders;
        ``tune.json`` keeps the settings and each epoch's terms. A folder tuned with other settings is refused.
        """
        from .data.metadata import get_source_info, get_spec, weights_tensor
        from .pipelines.neural_field_generation import load_generation_folder
        from .tokenization.code import tune_decoder_to_prior
        from .tokenization.train import SHAPE_AUTOENCODER_POINTS, SHAPE_AUTOENCODER_POOL, field_coords

        tuning = tuning or DecoderTuning()
        settings = tuning.settings(top_k, temperature)
        folder = self.strategy_dir("code") / name
        if (folder / "tune.json").is_file():
            _check_cached(folder, json.loads((folder / "tune.json").read_text(encoding="utf-8"))["settings"], settings)
            if not (folder / "tokenizer").is_dir():
                raise RunMismatchError(f"{folder} holds tuned decoders in the layout of an older tune_decoder.py (the "
                                       "VAE at its root, no NefGPT): delete it or choose another name")
            if file_digest(folder / "model.safetensors") != file_digest(self.train("code") / "model.safetensors"):
                raise RunMismatchError(f"{folder} was tuned to the draws of another NefGPT than the one in "
                                       f"{self.strategy_dir('code') / 'model'} (trained again since?): delete it or "
                                       "choose another name")
            return folder
        model_dir = self.train("code")
        model, _ = load_generation_folder(model_dir)
        model.to(self.device).eval()
        with torch.no_grad():
            prior = torch.cat([model.sample(num_samples=min(1000, tuning.prior_codes - start), temperature=temperature,
                                            top_k=top_k, seed=PRIOR_SEED + start).float().cpu()
                               for start in range(0, tuning.prior_codes, 1000)])
        fields = self.fit()
        spec, source = get_spec(fields), get_source_info(fields)
        occupancy = source.get("kind") == "occupancy"
        coords = field_coords(source, spec, num_points=SHAPE_AUTOENCODER_POOL if occupancy else 4096)
        tuned = self.code_vae()  # on the run's device
        history = tune_decoder_to_prior(tuned, weights_tensor(fields).float(), prior, coords, epochs=tuning.epochs,
                                        cycle_weight=tuning.cycle_weight, lr=tuning.lr, batch_size=tuning.batch_size,
                                        mmd_weight=tuning.mmd_weight, seed=tuning.seed, progress=self.progress,
                                        points_per_step=SHAPE_AUTOENCODER_POINTS if occupancy else None)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file in model_dir.iterdir():  # NefGPT itself, unchanged
            if file.is_file() and file.name in ("config.json", "model.safetensors", "generation_config.json"):
                shutil.copy2(file, tmp / file.name)
        tuned.cpu().save_pretrained(tmp / "tokenizer")
        if (model_dir / "README.md").is_file():  # NefGPT's card, and what differs here
            card = (model_dir / "README.md").read_text(encoding="utf-8").rstrip("\n")
            terms = f"{tuning.cycle_weight:g} × the cycle term" + (
                f" and {tuning.mmd_weight:g} × the realism term (the MMD between the draws' decoded fields and the "
                "training fields)" if tuning.mmd_weight else "")
            card += (f"\n\n## Decoders tuned to this model's draws\n\nThe `tokenizer/` here is the code VAE NefGPT "
                     f"was trained over, its decoders fine-tuned (`nef_transformers.tokenization.code."
                     f"tune_decoder_to_prior`, {tuning.epochs} epochs) to {tuning.prior_codes:,} of NefGPT's own draws "
                     f"(top-k {top_k}, temperature {temperature:g}): the training fields' reconstruction plus {terms}. "
                     "NefGPT's weights and the VAE's encoders are unchanged, so the codes it samples mean what they "
                     "meant in training. The settings and each epoch's terms: `tune.json`.\n")
            (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / "tune.json").write_text(json.dumps({"settings": settings, "history": history}, indent=2),
                                       encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    def tuned_code_vae(self, folder: Path):
        """The tuned `NefCodeVAE` of a `tune_decoders` folder, on the run's device."""
        from .tokenization.code import NefCodeVAE

        return NefCodeVAE.from_pretrained(Path(folder) / "tokenizer").to(self.device).eval()

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate_weights(self, weights: torch.Tensor, name: str, extra: dict | None = None,
                         latents: torch.Tensor | None = None) -> dict:
        """Metrics of generated weights against the held-out test items (one row of the results table); with the
        ``latents`` they were decoded from (learned strategy), also their `latent_nn_ratio`."""
        from .data.metadata import get_source_info, get_spec
        from .metrics import generation_metrics

        dataset = self.fit()
        spec, source_info = get_spec(dataset), get_source_info(dataset)
        items, valid = render_items(self.source.kind, spec, weights, source_info, self.device, progress=self.progress)
        references, train_items = self.reference("test"), self.reference("train")
        row = {"strategy": name, **(extra or {}), "num_samples": len(weights), "invalid": int((~valid).sum()),
               "latent_nn_ratio": None if latents is None else self.latent_nn_ratio(latents)}
        kept = [item for item in items if item is not None]
        if len(kept) < 2:
            logger.warning("%s: only %d of %d samples render; no metrics", name, len(kept), len(weights))
            return {**row, "mmd": None, "cov": None, "one_nna": None, "one_nna_samples": None,
                    "one_nna_references": None, "fd": None, "memorisation_ratio": None, "recognised": None,
                    "class_spread": None}
        if row["invalid"]:
            logger.warning("%s: %d of %d samples are NaN or render empty; they are left out (HyperDiffusion drops "
                           "empty meshes)", name, row["invalid"], len(weights))
        samples = np.stack(kept)
        net = self.feature_net()
        metrics = generation_metrics(samples, references, modality=self.kind, feature_net=net, train_items=train_items,
                                     allow_unequal=len(samples) != len(references), device=self.device,
                                     progress=self.progress)
        row.update({k: metrics.get(k) for k in ("mmd", "cov", "one_nna", "one_nna_samples", "one_nna_references", "fd",
                                                "memorisation_ratio")})
        row["recognised"], row["class_spread"] = None, None
        if net is not None and self.kind == "image":
            probabilities = net.predict_proba(samples, device=self.device)
            row["recognised"] = float((probabilities.max(1) >= 0.9).mean())
            counts = np.bincount(probabilities.argmax(1), minlength=probabilities.shape[1])
            shares = counts / counts.sum()
            entropy = -(shares[shares > 0] * np.log(shares[shares > 0])).sum()
            row["class_spread"] = abs(float(entropy / math.log(len(shares))))  # 1: every class equally often (abs: no -0.0)
            row["class_counts"] = counts.tolist()
        return row

    @torch.no_grad()
    def _training_latents(self) -> torch.Tensor:
        """The training fields' latents under the learned strategy's autoencoder, ``(n, t, latent_dim)`` float32."""
        if self._train_latents is None:
            from .data.metadata import weights_tensor

            autoencoder = self._autoencoder()
            self._train_latents = torch.cat([autoencoder.encode(part.to(self.device).float()).float().cpu()
                                             for part in weights_tensor(self.fit()).split(256)])
        return self._train_latents

    def latent_nn_ratio(self, latents: torch.Tensor) -> float | None:
        """Copies in the learned strategy's latent space: the median distance from each of ``latents`` (as a
        generator drew them, before decoding) to the nearest training field's latents, over the training fields'
        own median distance to their nearest other training field (the memorisation ratio's formula, with the
        training set, leave-one-out, as the held-out set).

        About 1 for latents as new as the training fields' are to one another (held-out chairs and digits, fitted and
        encoded, read 1.00 and 1.02); far below 1 for copies, jittered or not, which the memorisation ratio on
        rendered items can miss (chairs: RESULTS.md, session 8). Re-encoding decoded fields is no substitute: the
        encoder is not the decoder's inverse away from the training fields.
        Samples holding NaN or inf are left out (as from the other metrics); None when none is left.
        """
        train = self._training_latents().flatten(1).double()
        latents = torch.as_tensor(latents).flatten(1).double()
        if latents.shape[1] != train.shape[1]:
            raise ValueError(f"latents hold {latents.shape[1]} values per field, the autoencoder's "
                             f"{train.shape[1]}")
        latents = latents[torch.isfinite(latents).all(1)]
        if len(latents) == 0:
            return None
        if len(train) < 2:
            raise ValueError(f"the latent NN ratio needs >= 2 training fields, got {len(train)}")
        among_train = float(np.median(nearest_distances(train, train, exclude_self=True)))
        if among_train == 0.0:
            raise ValueError("half or more of the training fields have an identical twin in latent space: the "
                             "latent NN ratio is undefined")
        return float(np.median(nearest_distances(latents, train))) / among_train

    def _oracle_weights(self, seed: int = 0) -> torch.Tensor:
        """As many training fields as test items (a seeded choice): the oracle generator's samples."""
        from .data.metadata import weights_tensor

        train_weights = weights_tensor(self.fit())
        rows = torch.randperm(len(train_weights), generator=torch.Generator().manual_seed(seed))[:len(self.split()[1])]
        return train_weights[rows]

    def code_vae(self):
        """The code strategy's trained `NefCodeVAE` (tokenizing first if needed), on the run's device."""
        from .tokenization.code import NefCodeVAE

        return NefCodeVAE.from_pretrained(self.tokenize("code") / "tokenizer").to(self.device)

    def sequence_latents(self, strategy: str, sequences: torch.Tensor) -> torch.Tensor | None:
        """The learned strategy's latents behind sampled ``sequences``: themselves (learned), the `NefCodeVAE`'s
        decoding of them (code), None for the other strategies."""
        if strategy == "learned":
            return sequences
        if strategy == "code":
            with torch.no_grad():
                return self.code_vae().decode_latents(sequences.to(self.device)).cpu()
        return None

    def code_rows(self, seed: int = 0) -> list[dict]:
        """``code-train`` (the oracle's training fields through the code VAE: encoded to their posterior means,
        decoded; the ceiling of any prior over the codes) and ``gaussian-code`` (codes from the VAE's own prior
        N(0, I), decoded: the trivial prior NefGPT over codes has to beat)."""
        vae = self.code_vae()
        oracle = self._oracle_weights(seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            codes = {"code-train": torch.cat([vae.encode(part.to(self.device)).cpu() for part in oracle.split(256)]),
                     "gaussian-code": torch.randn(len(oracle), vae.num_tokens, vae.chunk_width, generator=generator)}
        rows = []
        for name, code in codes.items():
            weights, latents = decode_codes(vae, code)
            rows.append(self.evaluate_weights(weights, name, latents=latents))
        return rows

    def code_mixture_row(self, seed: int = 0, components: int = 8) -> dict:
        """``mixture-code``: a mixture of ``components`` full-covariance Gaussians (scikit-learn's EM) fitted to the
        code strategy's training sequences (the posterior draws NefGPT trains on), ``seed`` its initialisation and
        draws; as many codes as test items, decoded like NefGPT's. The classical density over the same codes: a
        NefGPT over codes that does not beat it has learned no more than a few clusters (RESULTS.md, session 13).
        Needs scikit-learn (``pip install "nef_transformers[benchmarks]"``)."""
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be an int >= 1, got {components!r}")
        try:
            from sklearn.mixture import GaussianMixture
        except ImportError as error:
            raise ImportError('the mixture-code row needs scikit-learn: pip install "nef_transformers[benchmarks]"'
                              ) from error
        from datasets import load_from_disk

        vae = self.code_vae()
        dataset = load_from_disk(str(self.tokenize("code") / "dataset")).with_format("numpy")
        codes = np.asarray(dataset["chunks"], dtype=np.float64).reshape(len(dataset), -1)
        if len(codes) < components:
            raise ValueError(f"a mixture of {components} Gaussians needs >= {components} training codes, got "
                             f"{len(codes)}")
        mixture = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(codes)
        count = len(self.split()[1])
        drawn = torch.as_tensor(mixture.sample(count)[0], dtype=torch.float32)
        weights, latents = decode_codes(vae, drawn.view(count, vae.num_tokens, vae.chunk_width))
        return self.evaluate_weights(weights, "mixture-code", {"components": components, "seed": seed},
                                     latents=latents)

    def _autoencoder(self):
        """The learned strategy's trained `NefAutoencoder` (tokenizing first if needed), on the run's device."""
        from .tokenization.learned import NefAutoencoder

        return NefAutoencoder.from_pretrained(self.tokenize("learned") / "tokenizer").to(self.device)

    def autoencoder_row(self, seed: int = 0) -> dict:
        """``autoencoder-train``: the oracle's training fields passed through the learned strategy's autoencoder
        (encode -> decode). The ceiling of any prior over its latents: a perfect NefGPT would score this."""
        autoencoder = self._autoencoder()
        oracle = self._oracle_weights(seed)
        with torch.no_grad():
            decoded = torch.cat([autoencoder(part.to(self.device))[0].cpu() for part in oracle.split(256)])
            latents = torch.cat([autoencoder.encode(part.to(self.device)).cpu() for part in oracle.split(256)])
        return self.evaluate_weights(decoded, "autoencoder-train", latents=latents)

    def latent_gaussian_row(self, seed: int = 0) -> dict:
        """``gaussian-latent``: one Gaussian fitted to the training fields' latents (the learned strategy's
        autoencoder), sampled and decoded. The trivial prior over the same latents: a NefGPT that does not beat
        it has learned no more than their mean and covariance."""
        from .data.metadata import weights_tensor

        weights, latents = latent_gaussian_weights(self._autoencoder(), weights_tensor(self.fit()),
                                                   len(self.split()[1]), seed, return_latents=True)
        return self.evaluate_weights(weights, "gaussian-latent", latents=latents)

    def latent_noisy_row(self, seed: int = 0, noise_scale: float = 0.3) -> dict:
        """``noisy-latent``: training fields with noise of ``noise_scale`` x each latent entry's std added to their
        latents (the learned strategy's autoencoder), decoded. Perturbed copies: what the metrics and the
        memorisation check give a generator that only jitters the training set."""
        from .data.metadata import weights_tensor

        weights, latents = latent_noisy_weights(self._autoencoder(), weights_tensor(self.fit()), len(self.split()[1]),
                                                noise_scale, seed, return_latents=True)
        return self.evaluate_weights(weights, "noisy-latent", {"noise_scale": noise_scale}, latents=latents)

    def baseline_rows(self, seed: int = 0, noise_scale: float = 0.5) -> list[dict]:
        """``oracle-train`` (training fields as the generator, as many as test items), ``noisy-train`` (training
        weights plus ``noise_scale`` x per-parameter std of noise) and ``gaussian`` (one Gaussian in weight space)."""
        from .data.metadata import weights_tensor

        train_weights = weights_tensor(self.fit())
        count = len(self.split()[1])
        return [
            self.evaluate_weights(self._oracle_weights(seed), "oracle-train"),
            self.evaluate_weights(noisy_weights(train_weights, count, noise_scale, seed), "noisy-train",
                                  {"noise_scale": noise_scale}),
            self.evaluate_weights(gaussian_weights(train_weights, count, seed), "gaussian"),
        ]


# ------------------------------------------------------------------------------------------------ reports
# 1-NNA alone can mislead: samples scattered far from everything (and from each other) have references as their
# nearest neighbours, which lowers the samples' half while the references' half stays high; the two halves show it
METRIC_COLUMNS = (("mmd", "MMD ↓", "{:.4g}"), ("cov", "COV ↑", "{:.1%}"), ("one_nna", "1-NNA (50% best)", "{:.1%}"),
                  ("one_nna_samples", "1-NNA of S / R", "{:.0%}"),
                  ("fd", "Fréchet ↓", "{:.3g}"), ("memorisation_ratio", "mem. ratio", "{:.2f}"),
                  ("latent_nn_ratio", "latent NN ratio", "{:.2f}"),
                  ("recognised", "recognised", "{:.1%}"), ("class_spread", "class spread", "{:.2f}"))


def decode_codes(vae, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, latents)`` on the CPU of a `NefCodeVAE`'s ``codes (n, t, w)`` (e.g. NefGPT's sampled sequences):
    the learned strategy's latents its decoders give, and the fields' weights the autoencoder decodes them to."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        latents = vae.decode_latents(codes.to(device))
        return vae.autoencoder.decode(latents).float().cpu(), latents.cpu()


def generator_setting(row: dict) -> tuple:
    """The setting a result row's draws share: ``(strategy, top_k, temperature)``."""
    return row["strategy"], row.get("top_k"), row.get("temperature")


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per generator setting (strategy, top-k, temperature) sampled with two or more seeds: each metric's
    mean over the seeds, ``seeds`` (their list), ``invalid`` and ``num_samples`` summed, and ``one_nna_sd`` /
    ``one_nna_se`` (the 1-NNA's standard deviation over the seeds and its mean's standard error). On the chairs
    one draw of 178 samples spreads by 1.3-2.7 points of 1-NNA (RESULTS.md, session 12): compare settings by
    these means, not by single draws. A metric missing (None) from any of a setting's rows is None in its mean;
    other keys the rows share (their settings) are copied."""
    metrics = (*(key for key, _, _ in METRIC_COLUMNS), "one_nna_references")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("seed") is not None:
            groups.setdefault(generator_setting(row), []).append(row)
    means = []
    for (strategy, top_k, temperature), members in groups.items():
        if len({row["seed"] for row in members}) < 2:
            continue
        mean = {"strategy": strategy, "top_k": top_k, "temperature": temperature, "seed": None,
                "seeds": [row["seed"] for row in members], "invalid": sum(row["invalid"] for row in members),
                "num_samples": sum(row["num_samples"] for row in members)}
        for key in metrics:
            values = [row.get(key) for row in members]
            mean[key] = None if any(v is None for v in values) else float(np.mean(values))
        for key, value in members[0].items():  # settings the draws share (e.g. a prior's components)
            if key not in mean and key not in metrics and all(row.get(key) == value for row in members):
                mean[key] = value
        nna = [row.get("one_nna") for row in members]
        spread = None if any(v is None for v in nna) else float(np.std(nna, ddof=1))
        mean["one_nna_sd"] = spread
        mean["one_nna_se"] = None if spread is None else spread / math.sqrt(len(nna))
        means.append(mean)
    return means


def figure_row(rows: list[dict]) -> dict | None:
    """The generator row a samples figure shows: of the settings (strategy, top-k, temperature), the one with the
    lowest mean 1-NNA over its draws, shown by its first draw in ``rows``, not its best one: with several seeds the
    best draw flatters the setting (chairs: a 66 % draw of a 68.8 % setting). Rows without a 1-NNA (no sample
    rendered) are left out; None when none is left."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("one_nna") is not None:
            groups.setdefault(generator_setting(row), []).append(row)
    if not groups:
        return None
    return min(groups.values(), key=lambda group: float(np.mean([row["one_nna"] for row in group])))[0]


def metrics_table(rows: list[dict]) -> str:
    """A Markdown table of result rows (None shown as "–"; a sampling seed other than 0 beside the generator; a
    `seed_means` row named "mean of N seeds", its 1-NNA with ± the standard error)."""
    head = ["generator", "top-k", "temp.", "invalid"] + [title for _, title, _ in METRIC_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = row["strategy"] + (f" (seed {row['seed']})" if row.get("seed") not in (None, 0) else "")
        if row.get("seeds"):
            name = f"{row['strategy']}, mean of {len(row['seeds'])} seeds"
        cells = [name, str(row.get("top_k") if row.get("top_k") is not None else "–"),
                 str(row.get("temperature") if row.get("temperature") is not None else "–"),
                 f"{row['invalid']}/{row['num_samples']}"]
        for key, _, fmt in METRIC_COLUMNS:
            value = row.get(key)
            cell = "–" if value is None else fmt.format(value)
            if key == "one_nna_samples" and value is not None and row.get("one_nna_references") is not None:
                cell += " / " + fmt.format(row["one_nna_references"])
            if key == "one_nna" and value is not None and row.get("one_nna_se") is not None:
                cell += f" ± {row['one_nna_se']:.1%}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_samples_figure(run: Run, weights: torch.Tensor, path: str | Path, count: int = 32, title: str = "") -> Path:
    """PNG: generated fields (left block) beside real held-out items (right block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.metadata import get_source_info, get_spec

    dataset = run.fit()
    spec, info = get_spec(dataset), get_source_info(dataset)
    count = min(count, len(weights))
    items, _ = render_items(run.source.kind, spec, weights[:count], info, run.device, progress=False)
    references = run.reference("test")
    real = references[np.linspace(0, len(references) - 1, count).round().astype(int)]  # spread over the (sorted) split
    columns = 8 if count >= 8 else count
    rows = -(-count // columns)
    three_d = run.kind == "points"
    figure = plt.figure(figsize=(2 * columns * 1.1 + 0.4, rows * 1.25 + 0.6))
    for block, (label, block_items) in enumerate((("generated", items), ("real (held out)", list(real)))):
        for i, item in enumerate(block_items[:count]):
            position = (i // columns) * (2 * columns) + block * columns + (i % columns) + 1
            axis = figure.add_subplot(rows, 2 * columns, position, projection="3d" if three_d else None)
            axis.set_axis_off()
            if item is None:
                axis.text(0.5, 0.5, "empty", ha="center", va="center", fontsize=7, color="red")
            elif three_d:
                axis.scatter(item[:, 0], item[:, 2], item[:, 1], s=0.3, c=item[:, 1], cmap="viridis")
                axis.view_init(elev=20, azim=-60)
            else:
                axis.imshow(item[..., 0] if item.shape[-1] == 1 else item, cmap="gray", vmin=0, vmax=1)
            if i == 0:
                axis.set_title(label, fontsize=9, loc="left")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_loss_figure(run: Run, strategy: str, path: str | Path) -> Path:
    """PNG: the fit loss curve (mean over fields) and NefGPT's training / validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.metadata import nef_metadata

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    curve = nef_metadata(run.fit())["fit"].get("loss_curve") or []
    left.plot(np.arange(1, len(curve) + 1), curve)
    left.set_yscale("log")
    left.set(title="fitting: mean MSE over fields", xlabel="Adam step", ylabel="loss")
    state_file = run.strategy_dir(strategy) / "model" / "trainer_state.json"
    if state_file.is_file():
        history = json.loads(state_file.read_text(encoding="utf-8")).get("log_history", [])
        train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
        if train:
            right.plot(*zip(*train), label="train")
        if evals:
            right.plot(*zip(*evals), "o-", label="validation")
        right.legend()
    right.set(title=f"NefGPT ({strategy})", xlabel="optimizer step", ylabel="loss")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["RunConfig", "Run", "RunMismatchError", "check_output_folder", "gaussian_weights", "metrics_table",
           "latent_gaussian_weights", "noisy_weights", "real_images", "real_point_clouds", "render_items",
           "save_loss_figure", "save_samples_figure", "seed_means", "split_indices", "subset_source"]
