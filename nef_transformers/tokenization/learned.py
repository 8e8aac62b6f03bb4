"""A learned embedding of neural-field weights: a set encoder over the network's neurons maps each field to a
sequence of latent vectors (one per neuron), a decoder maps them back to weights.

Neurons are the nodes (SANE's tokens, Schürholt et al. 2024, https://arxiv.org/abs/2406.09997): each node
carries its incoming weights and bias (a `NeuronChunker` chunk of ``w - w_init``, normalised per
(layer, column)) and a learned embedding of its (layer, neuron) position. Every node attends to every other
(a transformer encoder over the complete graph of neurons: the MLP's edges between consecutive layers are a
subset). The reconstruction loss is measured in function space, on the fields' outputs at their coordinates
(image pixels, points in the shape cube), plus a small weight-space term that anchors the directions the
coordinates do not constrain.

With ``encoder="function"`` (`NefAutoencoderConfig`) the encoder reads the field instead of its weights: its
outputs on a lattice (24³ points of the shape cube, 24 x 24 of the image), through a small CNN, to the same
``(t, latent_dim)`` latents; the decoder is the same. Two fitted fields that draw the same shape then encode alike
whatever their weights, and hidden-unit permutations change nothing. On the 711 ModelNet10 chairs it reconstructs
held-out chairs at occupancy IoU 0.544 where the neuron encoder reaches 0.330 (training chairs 0.725 / 0.706;
benchmarks/RESULTS.md, session 15): the neuron encoder memorises its 711 fields, the function encoder generalises.
At the same sampling temperature its codes gave samples nearer real chairs but less varied (NefGPT's 1-NNA 74.2 %
against 70.1 % at T 1.0); drawn wider (T 1.6) they reach 1-NNA 70.0 % and COV 50.2 % over fifteen draws, on the
issue's line. On MNIST it reconstructs held-out digits at 21.6 dB against 16.5 dB, and NefGPT's samples meet both
targets in every draw (1-NNA 63.7 % ± 0.5, COV 47.7 %; session 16). In the MNIST quickstart it gives 1-NNA 77.0 %
and COV 38.0 % against 82.8 % and 25.4 % (session 17), so the run-level defaults (`RunConfig`, the quickstart,
``nef-transformers tokenize``) use it. This config's own default stays ``"weights"``: autoencoder files written
before the option (without an ``encoder`` entry) load as what they are.

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` neurons (tokens), ``w`` chunk width, ``d`` features,
``n`` coordinates.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fields.siren import siren_forward
from ..fields.spec import SirenSpec
from .chunking import NeuronChunker

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FUNCTION_LOSSES = ("mse", "kl")
ENCODERS = ("weights", "function")


@dataclass
class NefAutoencoderConfig:
    """Sizes and loss weights of a `NefAutoencoder`.

    Args:
        spec (`dict`): the `SirenSpec` of the fields.
        latent_dim (`int`, *optional*, defaults to 4): width of each neuron's latent vector (a 2->32->32->1
            SIREN's hidden neurons carry 33 numbers). Narrow latents are easier for NefGPT to model: at the same
            budget, latents of 4 / 8 / 16 gave NefGPT samples of COV 19.5 / 17.3 / 7.2 % and 1-NNA 88.4 / 92.4 /
            96.9 % on MNIST, though the autoencoder's own ceiling falls (COV 29.7 / 35.6 / 47.7 %; RESULTS.md).
        hidden_size (`int`, *optional*, defaults to 64): width of the encoder and decoder.
        num_layers (`int`, *optional*, defaults to 2): transformer layers of the encoder and of the decoder.
            64 x 2 against 32 x 1 on MNIST (4-wide latents): the generator's 1-NNA 70.4 % against 85.8 % (30
            epochs each, benchmarks/RESULTS.md); 15 epochs on 4,000 fields take ~3 min on 2 CPU cores against
            ~1.7 min.
        num_heads (`int`, *optional*, defaults to 4): attention heads.
        function_loss_weight (`float`, *optional*, defaults to 1.0): weight of the function-space term.
        weight_loss_weight (`float`, *optional*, defaults to 0.1): weight of the normalised-chunk MSE.
        function_loss (`str`, *optional*, defaults to `"mse"`): the function-space term. `"mse"`: mean squared
            difference of the outputs (images: pixel values). `"kl"`: for occupancy fields, whose outputs are
            logits: the binary KL divergence from the original field's occupancy probability to the decoded
            one's, which cares where the surface is, not how large a logit far from it is.
        latent_noise (`float`, *optional*, defaults to 0.0): training only: Gaussian noise added to the latents
            before decoding, its std this many times the latents' own std per latent dimension over the batch
            (detached, so the encoder cannot outgrow it by scaling up). It teaches the decoder to tolerate the
            small errors a prior makes when it generates latents (the regularised latents of latent diffusion:
            Rombach et al. 2022, https://arxiv.org/abs/2112.10752). 0: the plain autoencoder.
        encoder (`str`, *optional*, defaults to `"weights"`): what the encoder reads. `"weights"`: the neurons'
            weights (the transformer over the network's neurons, the module doc). `"function"`: the field's
            outputs on an ``encoder_resolution`` lattice (occupancy probabilities for ``function_loss="kl"``, the
            outputs themselves otherwise), through a CNN (2-D for images, 3-D for shapes): three stride-2
            convolutions of 32, 64 and 128 channels, then an MLP of width 512 to the latents. It generalises to
            fields it was not trained on where the weights encoder memorises (chairs: RESULTS.md, session 15).
            Needs a 2-D or 3-D input.
        encoder_resolution (`int`, *optional*, defaults to 24): lattice points per axis the function encoder reads
            (a multiple of 8). Shapes: the cube ``[-0.5, 0.5]³``; images: pixel centres on ``[-1, 1]²``.
    """

    spec: dict
    latent_dim: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    function_loss_weight: float = 1.0
    weight_loss_weight: float = 0.1
    function_loss: str = "mse"
    latent_noise: float = 0.0
    encoder: str = "weights"
    encoder_resolution: int = 24

    def __post_init__(self):
        if self.function_loss not in FUNCTION_LOSSES:
            raise ValueError(f"NefAutoencoderConfig.function_loss must be one of {FUNCTION_LOSSES}, "
                             f"got {self.function_loss!r}")
        for name in ("latent_dim", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"NefAutoencoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"NefAutoencoderConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.function_loss_weight < 0 or self.weight_loss_weight < 0 or \
                self.function_loss_weight + self.weight_loss_weight == 0:
            raise ValueError("NefAutoencoderConfig loss weights must be >= 0 and not both 0")
        if not self.latent_noise >= 0:
            raise ValueError(f"NefAutoencoderConfig.latent_noise must be >= 0, got {self.latent_noise}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"NefAutoencoderConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        resolution = self.encoder_resolution
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
            raise ValueError(f"NefAutoencoderConfig.encoder_resolution must be a multiple of 8 (>= 8), got "
                             f"{resolution!r}")
        in_dim = SirenSpec.from_dict(self.spec).in_dim
        if self.encoder == "function" and in_dim not in (2, 3):
            raise ValueError(f"the function encoder reads a 2-D or 3-D lattice; the spec's fields take {in_dim}-D "
                             "inputs")


def occupancy_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean binary KL divergence ``KL(p || q)`` from ``p = sigmoid(target_logits)`` to ``q = sigmoid(logits)``:
    cross-entropy minus the target's entropy, so 0 exactly when the occupancy probabilities agree."""
    p = torch.sigmoid(target_logits)
    cross = nn.functional.binary_cross_entropy_with_logits(logits, p, reduction="none")
    entropy = nn.functional.binary_cross_entropy_with_logits(target_logits, p, reduction="none")
    return (cross - entropy).mean()


def _stack(config: NefAutoencoderConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(config.hidden_size, config.num_heads, 4 * config.hidden_size, dropout=0.0,
                                       batch_first=True, norm_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)


def _encoder_lattice(in_dim: int, resolution: int) -> torch.Tensor:
    """The function encoder's input points, ``(resolution ** in_dim, in_dim)``, in row-major lattice order."""
    if in_dim == 3:
        from ..fields.render import volume_grid

        return volume_grid(resolution)
    from ..data.images import image_grid

    return image_grid(resolution, resolution)


def _field_cnn(in_dim: int, channels: int, resolution: int, outputs: int) -> nn.Sequential:
    """Three stride-2 convolutions (32, 64, 128 channels; ``resolution`` -> ``resolution / 8``), then an MLP."""
    conv = nn.Conv3d if in_dim == 3 else nn.Conv2d
    return nn.Sequential(
        conv(channels, 32, 4, stride=2, padding=1), nn.SiLU(),
        conv(32, 64, 4, stride=2, padding=1), nn.SiLU(),
        conv(64, 128, 4, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
        nn.Linear(128 * (resolution // 8) ** in_dim, 512), nn.SiLU(), nn.Linear(512, outputs))


class NefAutoencoder(nn.Module):
    """Weights ``(b, p)`` -> latents ``(b, t, latent_dim)`` -> weights ``(b, p)``.

    Args:
        config: sizes (`NefAutoencoderConfig`).
        shared_init: ``(p,)`` the fields' shared initialisation (chunks hold ``w - w_init``), or None.
        scale: ``(t, w)`` per-entry normalisation of the chunks (``train.chunk_scale``); ones when None.
    """

    def __init__(self, config: NefAutoencoderConfig, shared_init: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.spec = SirenSpec.from_dict(config.spec)
        self.chunker = NeuronChunker(self.spec, shared_init, "neuron")
        t, w = self.chunker.num_chunks, self.chunker.chunk_width
        self.register_buffer("scale", torch.ones(t, w) if scale is None else scale.detach().clone().float())
        self.register_buffer("mask", self.chunker.mask.float())
        self.register_buffer("has_shared_init", torch.tensor(shared_init is not None))
        self.register_buffer("shared_init", torch.zeros(self.spec.num_params) if shared_init is None
                             else torch.as_tensor(shared_init).detach().clone().float())
        d = config.hidden_size
        if config.encoder == "weights":
            # 1. encoder: chunk -> d, plus a learned embedding of the neuron's place (layer, index)
            self.encoder_in = nn.Linear(w, d)
            self.encoder_position = nn.Parameter(torch.randn(t, d) * 0.02)
            self.encoder = _stack(config)
            self.to_latent = nn.Linear(d, config.latent_dim)
        else:
            # 1. encoder: the field's outputs on a lattice -> CNN -> latents (the lattice is not saved: it is the
            # config's)
            self.register_buffer("lattice", _encoder_lattice(self.spec.in_dim, config.encoder_resolution),
                                 persistent=False)
            self.field_encoder = _field_cnn(self.spec.in_dim, self.spec.out_dim, config.encoder_resolution,
                                            t * config.latent_dim)
        # 2. decoder: latent -> d, the same kind of place embedding, back to a chunk
        self.decoder_in = nn.Linear(config.latent_dim, d)
        self.decoder_position = nn.Parameter(torch.randn(t, d) * 0.02)
        self.decoder = _stack(config)
        self.decoder_out = nn.Linear(d, w)

    @property
    def num_tokens(self) -> int:
        return self.chunker.num_chunks

    def chunks(self, weights: torch.Tensor) -> torch.Tensor:
        """``(b, p)`` -> ``(b, t, w)`` normalised chunks of ``w - w_init``."""
        return self.chunker.to_chunks(weights.float()) / self.scale

    def encode(self, weights: torch.Tensor) -> torch.Tensor:
        """``(b, p)`` weights -> ``(b, t, latent_dim)`` latents."""
        if self.config.encoder == "function":
            outputs = siren_forward(self.spec, weights.float(), self.lattice)  # (b, n, out_dim)
            if self.config.function_loss == "kl":  # occupancy logits -> probabilities, centred
                outputs = torch.sigmoid(outputs) - 0.5
            r = self.config.encoder_resolution
            volume = outputs.transpose(1, 2).reshape(len(weights), self.spec.out_dim, *([r] * self.spec.in_dim))
            return self.field_encoder(volume).view(len(weights), self.num_tokens, self.config.latent_dim)
        hidden = self.encoder_in(self.chunks(weights)) + self.encoder_position  # (b, t, d)
        return self.to_latent(self.encoder(hidden))

    def decode_chunks(self, latents: torch.Tensor) -> torch.Tensor:
        """``(b, t, latent_dim)`` -> ``(b, t, w)`` normalised chunks (zero where padded)."""
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (self.num_tokens, self.config.latent_dim):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit this autoencoder: expected "
                             f"(b, {self.num_tokens}, {self.config.latent_dim})")
        hidden = self.decoder_in(latents) + self.decoder_position
        return self.decoder_out(self.decoder(hidden)) * self.mask

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(b, t, latent_dim)`` latents -> ``(b, p)`` weights."""
        return self.chunker.from_chunks(self.decode_chunks(latents) * self.scale)

    def forward(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstructed weights (b, p), latents (b, t, latent_dim))``."""
        latents = self.encode(weights)
        return self.decode(latents), latents

    def loss(self, weights: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The function-space term (``config.function_loss``) of the fields' outputs on ``coords`` (``(n, in_dim)``
        shared, or ``(b, n, in_dim)`` per field) plus the weight-space MSE; in training mode the latents get
        ``config.latent_noise`` first."""
        latents = self.encode(weights)
        if self.training and self.config.latent_noise > 0:
            spread = latents.detach().flatten(0, 1).std(0)  # (latent_dim,)
            latents = latents + self.config.latent_noise * spread * torch.randn_like(latents)
        chunks = self.decode_chunks(latents)
        target_chunks = self.chunks(weights)
        weight_mse = ((chunks - target_chunks) ** 2).sum() / (self.mask.sum() * weights.shape[0])
        decoded = self.chunker.from_chunks(chunks * self.scale)
        with torch.no_grad():
            target = siren_forward(self.spec, weights.float(), coords)
        output = siren_forward(self.spec, decoded, coords)
        function_mse = ((output - target) ** 2).mean()
        parts = {"function_mse": float(function_mse.detach())}
        if self.config.function_loss == "kl":
            function_term = occupancy_kl(output, target)
            parts["function_kl"] = float(function_term.detach())
        else:
            function_term = function_mse
        total = self.config.function_loss_weight * function_term + self.config.weight_loss_weight * weight_mse
        parts["weight_mse"] = float(weight_mse.detach())
        return total, parts

    # ------------------------------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors`` (parameters and buffers: scale, shared init)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump({"model_type": "nef_autoencoder", **asdict(self.config)}, handle, indent=2, sort_keys=True)
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "NefAutoencoder":
        settings, state = read_saved_model(directory, "nef_autoencoder", cls.__name__)
        shared_init = state["shared_init"] if bool(state["has_shared_init"]) else None
        model = cls(NefAutoencoderConfig(**settings), shared_init, state["scale"])
        model.load_state_dict(state)
        return model.eval()


def read_saved_model(directory: str | os.PathLike, model_type: str, name: str) -> tuple[dict, dict]:
    """``(settings, state)`` of a folder written by a ``save_pretrained`` here: ``config.json`` without its
    ``model_type`` (which must be ``model_type``) and the tensors of ``model.safetensors`` (never a pickle).
    Raises a `FileNotFoundError` naming the missing file, a `ValueError` for a folder of another model (``name``
    is the class the caller wanted)."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} is not a saved {name}: {os.path.basename(path)} is missing")
    with open(config_path, encoding="utf-8") as handle:
        settings = json.load(handle)
    if settings.pop("model_type", None) != model_type:
        raise ValueError(f"{config_path} does not describe a {name}")
    return settings, load_file(weights_path)


def train_autoencoder(
    weights: torch.Tensor,
    spec: SirenSpec,
    shared_init: torch.Tensor | None,
    coords: torch.Tensor,
    config: NefAutoencoderConfig | None = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    points_per_step: int | None = None,
    surface_fraction: float = 0.0,
) -> tuple[NefAutoencoder, dict]:
    """Train a `NefAutoencoder` on ``weights (b, p)`` with the loss measured on ``coords (n, in_dim)``, on
    ``device`` (the batches move there; the returned model is back on the CPU).

    Args:
        points_per_step: None: every step compares the outputs on all of ``coords``. A number: ``coords`` is a
            pool, and each step draws that many points from it afresh (a fixed set lets the decoder fit those
            points and nothing between them).
        surface_fraction: the share of each step's points drawn, per field, near that field's surface: among
            the pool's points, the eighth where the original field's output is closest to 0 (its decision
            boundary), jittered by half a pool spacing. For occupancy fields, whose shape is only that boundary;
            needs ``points_per_step``.

    Returns the model (eval mode) and ``{"loss_curve": mean loss per epoch, "function_mse", "weight_mse"}``
    (plus ``"function_kl"`` with ``config.function_loss="kl"``) of the last epoch.
    """
    from .train import chunk_scale

    spec.check_weights(weights)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs >= 1, batch_size >= 1 and lr > 0 are needed, got {epochs}, {batch_size}, {lr}")
    if not 0.0 <= surface_fraction <= 1.0:
        raise ValueError(f"surface_fraction must be in [0, 1], got {surface_fraction}")
    if points_per_step is not None and not 1 <= points_per_step <= len(coords):
        raise ValueError(f"points_per_step must be in [1, {len(coords)}] (the coordinate pool), got {points_per_step}")
    if surface_fraction > 0 and points_per_step is None:
        raise ValueError("surface_fraction > 0 needs points_per_step (the points are drawn from the pool each step)")
    config = config or NefAutoencoderConfig(spec=spec.to_dict())
    if SirenSpec.from_dict(config.spec) != spec:
        raise ValueError(f"config.spec {SirenSpec.from_dict(config.spec)} differs from the weights' {spec}")
    torch.manual_seed(seed)
    weights = weights.float()
    chunker = NeuronChunker(spec, shared_init, "neuron")
    model = NefAutoencoder(config, shared_init, chunk_scale(chunker, chunker.to_chunks(weights))).to(device)
    coords = coords.float()
    generator = torch.Generator().manual_seed(seed)
    draw = None if points_per_step is None else \
        _PointSampler(spec, weights, coords, points_per_step, surface_fraction, generator, progress)
    coords = coords.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-weights.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    curve, last = [], {}
    bar = tqdm(total=steps, desc="training the autoencoder", disable=not progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(weights.shape[0], generator=generator)
        total, sums = 0.0, {}
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = weights[rows].to(device, non_blocking=True)
            loss, parts = model.loss(batch, coords if draw is None else draw(rows).to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            bar.update(1)
        curve.append(total / len(order))
        last = {key: value / len(order) for key, value in sums.items()}
        bar.set_postfix(loss=f"{curve[-1]:.3g}")
    bar.close()
    return model.cpu().eval(), {"loss_curve": curve, **last}


class _PointSampler:
    """Each step's coordinates for `train_autoencoder` (its ``points_per_step`` and ``surface_fraction``):
    ``rows`` (field indices) -> ``(b, n, in_dim)`` points."""

    def __init__(self, spec, weights, pool, points_per_step, surface_fraction, generator, progress):
        from ..fields.siren import evaluate_in_chunks

        self.pool, self.generator = pool, generator
        self.num_surface = int(round(points_per_step * surface_fraction))
        self.num_uniform = points_per_step - self.num_surface
        self.near = None
        if self.num_surface:
            # Per field, the pool points nearest its decision boundary (smallest |output|): int32 (b, candidates).
            candidates = max(self.num_surface, len(pool) // 8)
            near = []
            for start in tqdm(range(0, len(weights), 256), desc="finding the fields' surfaces", disable=not progress):
                outputs = evaluate_in_chunks(spec, weights[start:start + 256].float(), pool).abs().sum(-1)
                near.append(outputs.topk(candidates, dim=1, largest=False).indices.int())
            self.near = torch.cat(near)
            # Jitter by half a pool spacing, so that the decoder sees the band, not only the pool's points.
            extent = (pool.max(0).values - pool.min(0).values).clamp_min(1e-6)
            self.jitter = 0.5 * extent / len(pool) ** (1.0 / pool.shape[1])

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        uniform = self.pool[torch.randint(len(self.pool), (self.num_uniform,), generator=self.generator)]
        points = uniform.unsqueeze(0).expand(len(rows), -1, -1)
        if self.near is None:
            return points
        near = self.near[rows]
        pick = torch.randint(near.shape[1], (len(rows), self.num_surface), generator=self.generator)
        surface = self.pool[near.gather(1, pick).long()]
        surface = surface + torch.randn(surface.shape, generator=self.generator) * self.jitter
        return torch.cat([points, surface], dim=1)


__all__ = ["NefAutoencoder", "NefAutoencoderConfig", "train_autoencoder"]
