"""A compact code per field: a VAE over a `NefAutoencoder`'s latents in shape-weighted coordinates.

The ``code`` strategy. The learned strategy gives each field one latent vector per neuron (97 x 4 numbers for a
3->32->32->32->1 SIREN), and NefGPT draws them one neuron at a time. This module compresses those latents once
more, into one short code per field that NefGPT draws in a few chunks:

1. the decoder's metric M = E[JᵀJ], J the Jacobian of the decoded fields' outputs (occupancy probabilities on a
   12³ grid for shapes, pixels on a 14 x 14 grid for images) with respect to the latents, by central differences
   on a few training fields (`decoder_metric`): directions of latent space that change the field count, the rest
   (which the autoencoder never constrained) do not;
2. shape-weighted coordinates y = M^½ (z - mean) / s (s: one number, the coordinates' RMS);
3. a VAE over y (MLPs, a Gaussian likelihood of fixed variance ``sigma2``: the larger, the stronger the pull of the
   codes towards N(0, I) and the fewer code dimensions stay in use);
4. optionally (``sort_codes``), code dimensions sorted by how much the training fields' codes spread along them,
   so that NefGPT's first chunks carry the coarse shape. Not the default: on the chairs NefGPT over sorted codes
   scored 1-NNA 77.4 % against 74.6 % over the VAE's own order (3 sampling settings each, RESULTS.md session 10),
   which mixes used and unused dimensions in every chunk;
5. optionally (``drop_inactive``), NefGPT's codes hold only the dimensions in use (sorted by spread, padded with the
   next ones to whole chunks); the others, whose posteriors stay at the prior N(0, 1) whatever the field, are
   decoded at its mean, 0. On the chairs 15 of 32 dimensions are in use and the other 17 are noise in every
   training sequence. Not the default: NefGPT over the 16 kept dimensions overfits sooner (best validation step
   125 against 325) and its samples read 1-NNA 72.2 % against 69.8 % over all 32 (the same VAE, five sampling
   seeds each; RESULTS.md, session 12): the noise dimensions regularise it.

After NefGPT is trained over the codes, `tune_decoder_to_prior` can fine-tune the decoders for the codes it draws
(a cycle term through the fixed encoders; the codes stay valid). On the chairs it made the samples bunch less (COV
48.8 % → 53.7 %) and moved 1-NNA by 0.7 ± 0.7 points, within noise (RESULTS.md, session 16).

`NefCodeVAE.encode` maps weights to ``(b, t, w)`` codes (the posterior means, cut into ``t`` chunks of ``w``),
`NefCodeVAE.decode` maps codes back to weights. On the 711 training chairs (RESULTS.md, "Chairs, session 9"), a
mixture over such codes came within 6 points of the autoencoder's own 1-NNA, where priors over the per-neuron
latents stayed 8 to 13 points above it.

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` code chunks (NefGPT positions), ``w`` chunk width,
``d`` latent numbers per field, ``c`` code dimensions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .learned import CONFIG_NAME, WEIGHTS_NAME, NefAutoencoder, NefAutoencoderConfig, read_saved_model

MODEL_TYPE = "nef_code_vae"
ACTIVE_SPREAD = 0.1  # a code dimension is in use when the training fields' posterior means spread with std above this


@dataclass
class NefCodeConfig:
    """Sizes and training settings of a `NefCodeVAE`.

    Args:
        code_dim (`int`, *optional*, defaults to 32): numbers per field's code. On the chairs, a 32-number code at
            ``sigma2`` 0.3 kept 15 dimensions in use; the others stay at the prior (the decoder ignores them).
        chunk_width (`int`, *optional*, defaults to 4): numbers per NefGPT position (``code_dim / chunk_width``
            positions); must divide ``code_dim``. ``code_dim``: one position, so NefGPT's head is one mixture over
            the whole code (with full covariances, `NefGPTConfig.mixture_covariance`, the chairs' best NefGPT:
            1-NNA 70.1 % against 71.2 % for chunks of 4 over ten draws; RESULTS.md, session 13).
        sigma2 (`float`, *optional*, defaults to 0.3): the likelihood's fixed variance in the (unit-RMS)
            shape-weighted coordinates. Larger: smoother codes, fewer in use, blurrier fields.
        width (`int`, *optional*, defaults to 512): width of the encoder's and decoder's two hidden layers.
        steps (`int`, *optional*, defaults to 4000): optimizer steps (about a minute on 2 CPU cores).
        batch_size (`int`, *optional*, defaults to 64): fields per step.
        learning_rate (`float`, *optional*, defaults to 1e-3): Adam's.
        metric_items (`int`, *optional*, defaults to 40): training fields the decoder's metric averages.
        metric_step (`float`, *optional*, defaults to 0.02): the central differences' step, in latent units.
        sort_codes (`bool`, *optional*, defaults to `False`): order the code dimensions by their spread over the
            training fields (the module doc's step 4).
        drop_inactive (`bool`, *optional*, defaults to `False`): codes hold only the dimensions in use (posterior
            means spreading with std > `ACTIVE_SPREAD` over the training fields), sorted by spread and padded with
            the next ones to a multiple of ``chunk_width``; the rest decode at 0 (the module doc's step 5: worse
            samples on the chairs).
        draws (`int`, *optional*, defaults to 8): codes per training field in the tokenised set: draws from the
            VAE's posterior q(code | field) (0: the posterior means only). NefGPT then learns the VAE's smoothed
            distribution instead of a few hundred points.
        seed (`int`, *optional*, defaults to 0): initialisation, batches, the metric's fields and the draws.
    """

    code_dim: int = 32
    chunk_width: int = 4
    sigma2: float = 0.3
    width: int = 512
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 1e-3
    metric_items: int = 40
    metric_step: float = 0.02
    sort_codes: bool = False
    drop_inactive: bool = False
    draws: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("code_dim", "chunk_width", "width", "steps", "batch_size", "metric_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NefCodeConfig.{name} must be an int >= 1, got {value!r}")
        if self.code_dim % self.chunk_width:
            raise ValueError(f"NefCodeConfig.chunk_width ({self.chunk_width}) must divide code_dim ({self.code_dim})")
        for name in ("sigma2", "learning_rate", "metric_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"NefCodeConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 0:
            raise ValueError(f"NefCodeConfig.draws must be an int >= 0, got {self.draws!r}")


def _mlp(inputs: int, outputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, outputs))


def _is_shape(kind: str) -> bool:
    if kind not in ("occupancy", "points", "image"):
        raise ValueError(f"kind must be 'occupancy' (or 'points') for shapes or 'image', got {kind!r}")
    return kind != "image"


def decoder_metric(autoencoder: NefAutoencoder, kind: str, latents: torch.Tensor, items: int, step: float = 0.02,
                   seed: int = 0, progress: bool = True) -> torch.Tensor:
    """M = mean over ``items`` seeded fields of ``latents (b, t, l)`` of JᵀJ, J = d(decoded field's outputs on a
    coarse grid) / d(latents), by central differences of ``step``: ``(d, d)`` float64, d = t x l.

    ``kind``: ``"occupancy"`` (or ``"points"``): occupancy probabilities on a 12³ grid of the shape cube;
    ``"image"``: the outputs on a 14 x 14 pixel grid.
    """
    from tqdm.auto import tqdm

    from ..fields.siren import siren_forward

    spec = autoencoder.spec
    if _is_shape(kind):
        from ..fields.render import volume_grid

        grid = volume_grid(12).to(latents.dtype)

        def outputs(weights):
            return torch.sigmoid(siren_forward(spec, weights, grid)[..., 0])
    else:
        from ..data.images import image_grid

        grid = image_grid(14, 14).to(latents.dtype)

        def outputs(weights):
            return siren_forward(spec, weights, grid).flatten(1)
    if latents.ndim != 3 or len(latents) == 0:
        raise ValueError(f"latents must be (b, t, l) with b >= 1, got shape {tuple(latents.shape)}")
    if not 1 <= items or not step > 0:
        raise ValueError(f"items >= 1 and step > 0 are needed, got {items} and {step}")
    shape, size = latents.shape[1:], latents[0].numel()
    chosen = torch.randperm(len(latents), generator=torch.Generator().manual_seed(seed))[:items]
    metric = torch.zeros(size, size, dtype=torch.float64)
    eye = torch.eye(size, dtype=latents.dtype)
    with torch.no_grad():
        for index in tqdm(chosen, desc="decoder metric", unit="field", disable=not progress):
            z = latents[index].flatten()
            columns = []
            for part in eye.split(shape[0]):
                plus = outputs(autoencoder.decode((z + step * part).view(-1, *shape)))
                minus = outputs(autoencoder.decode((z - step * part).view(-1, *shape)))
                columns.append((plus - minus) / (2 * step))
            jacobian = torch.cat(columns).double().T  # (outputs, d)
            metric += jacobian.T @ jacobian / len(chosen)
    return metric


def shape_weighted_frame(metric: torch.Tensor, latents: torch.Tensor):
    """``(centre, root, inverse_root, scale)`` of the shape-weighted coordinates y = M^½ (z - centre) / scale of
    ``latents (b, t, l)`` under the decoder's ``metric`` M (`decoder_metric`): the latents' mean ``(d,)``, M^½ and
    M^-½ ``(d, d)`` (float64; eigenvalues clamped at 0 plus 1e-6 of the largest, so M^-½ exists) and the RMS of
    M^½ (z - centre) over the fields (a float)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(metric)
    if not bool(eigenvalues[-1] > 0):
        raise ValueError("the decoder's metric is zero: the autoencoder's outputs do not change with its latents")
    eigenvalues = eigenvalues.clamp_min(0) + eigenvalues[-1] * 1e-6
    root = eigenvectors @ torch.diag(eigenvalues.sqrt()) @ eigenvectors.T
    inverse_root = eigenvectors @ torch.diag(1 / eigenvalues.sqrt()) @ eigenvectors.T
    flat = latents.flatten(1).double()
    centre = flat.mean(0)
    scale = float(((flat - centre) @ root).pow(2).mean().sqrt())
    return centre, root, inverse_root, scale


class NefCodeVAE(nn.Module):
    """Weights ``(b, p)`` -> codes ``(b, t, w)`` -> weights ``(b, p)``, through a `NefAutoencoder`'s latents.

    Args:
        config: sizes (`NefCodeConfig`).
        autoencoder: the trained `NefAutoencoder` whose latents the codes compress (kept, frozen, as a submodule).
        centre: ``(d,)`` the training fields' mean latents.
        root, inverse_root: ``(d, d)`` M^½ and M^-½ of the decoder's metric.
        scale: the shape-weighted coordinates' RMS (a number).
        order: ``(c,)`` the code dimensions' order (a permutation; None: as the encoder emits them).
        kept: how many of the ordered dimensions the codes hold (None: all ``c``); the rest decode at 0
            (``drop_inactive``).
    """

    def __init__(self, config: NefCodeConfig, autoencoder: NefAutoencoder, centre: torch.Tensor | None = None,
                 root: torch.Tensor | None = None, inverse_root: torch.Tensor | None = None, scale: float = 1.0,
                 order: torch.Tensor | None = None, kept: int | None = None):
        super().__init__()
        self.config = config
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        d = autoencoder.num_tokens * autoencoder.config.latent_dim
        self.register_buffer("centre", torch.zeros(d, dtype=torch.float64) if centre is None else centre.double())
        self.register_buffer("root", torch.eye(d, dtype=torch.float64) if root is None else root.double())
        self.register_buffer("inverse_root", torch.eye(d, dtype=torch.float64) if inverse_root is None
                             else inverse_root.double())
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("order", torch.arange(config.code_dim) if order is None else order.long().clone())
        kept = config.code_dim if kept is None else kept
        if not 0 < kept <= config.code_dim or kept % config.chunk_width:
            raise ValueError(f"kept ({kept}) must be a multiple of chunk_width ({config.chunk_width}) in "
                             f"[1, code_dim={config.code_dim}]")
        self.register_buffer("kept", torch.tensor(kept))
        self.encoder = _mlp(d, 2 * config.code_dim, config.width)
        self.decoder = _mlp(config.code_dim, d, config.width)

    @property
    def spec(self):
        return self.autoencoder.spec

    @property
    def num_tokens(self) -> int:
        """NefGPT positions per field."""
        return self.code_length // self.config.chunk_width

    @property
    def code_length(self) -> int:
        """Numbers per field's code as NefGPT sees it: ``code_dim``, or the dimensions kept (``drop_inactive``)."""
        return int(self.kept)

    @property
    def chunk_width(self) -> int:
        return self.config.chunk_width

    # ------------------------------------------------------------------------------------------ coordinates
    def to_coordinates(self, latents: torch.Tensor) -> torch.Tensor:
        """``(b, t', l)`` autoencoder latents -> ``(b, d)`` float32 shape-weighted coordinates."""
        flat = latents.flatten(1).double()
        return ((flat - self.centre) @ self.root / self.scale).float()

    def from_coordinates(self, y: torch.Tensor) -> torch.Tensor:
        """``(b, d)`` shape-weighted coordinates -> ``(b, t', l)`` float32 autoencoder latents."""
        flat = self.centre + y.double() * self.scale @ self.inverse_root
        return flat.float().view(len(y), self.autoencoder.num_tokens, self.autoencoder.config.latent_dim)

    def posterior(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log-variance)``, each ``(b, c)``, of q(code | y), in the sorted order (every dimension, kept
        or not)."""
        mean, log_var = self.encoder(y).chunk(2, -1)
        return mean[:, self.order], log_var[:, self.order]

    # ------------------------------------------------------------------------------------------ codes
    def encode(self, weights: torch.Tensor) -> torch.Tensor:
        """``(b, p)`` weights -> ``(b, t, w)`` codes (the posterior means)."""
        mean, _ = self.posterior(self.to_coordinates(self.autoencoder.encode(weights.float())))
        return mean[:, :self.code_length].reshape(len(weights), self.num_tokens, self.chunk_width)

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim == 2 and codes.shape[1] == self.code_length:
            codes = codes.view(len(codes), self.num_tokens, self.chunk_width)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (self.num_tokens, self.chunk_width):
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit this NefCodeVAE: expected "
                             f"(b, {self.num_tokens}, {self.chunk_width}) or (b, {self.code_length})")
        return codes

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """``(b, t, w)`` (or flat ``(b, code_length)``) codes -> ``(b, t', l)`` autoencoder latents."""
        codes = self.check_codes(codes).flatten(1).float()
        if self.code_length < self.config.code_dim:  # the dimensions not kept: at the prior's mean
            codes = torch.cat([codes, codes.new_zeros(len(codes), self.config.code_dim - self.code_length)], 1)
        flat = codes[:, self.order.argsort()]
        return self.from_coordinates(self.decoder(flat))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(b, t, w)`` (or flat ``(b, code_length)``) codes -> ``(b, p)`` weights."""
        return self.autoencoder.decode(self.decode_latents(codes))

    # ------------------------------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """``config.json`` (this config and the autoencoder's) + ``model.safetensors`` (both models' parameters
        and buffers)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        settings = {"model_type": MODEL_TYPE, **asdict(self.config), "autoencoder": asdict(self.autoencoder.config)}
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2, sort_keys=True)
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "NefCodeVAE":
        settings, state = read_saved_model(directory, MODEL_TYPE, cls.__name__)
        autoencoder_settings = settings.pop("autoencoder")
        prefix = "autoencoder."
        inner = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        shared_init = inner["shared_init"] if bool(inner["has_shared_init"]) else None
        autoencoder = NefAutoencoder(NefAutoencoderConfig(**autoencoder_settings), shared_init, inner["scale"])
        config = NefCodeConfig(**settings)
        if "kept" not in state and "drop_inactive" not in settings:  # written before drop_inactive: every dimension
            state["kept"] = torch.tensor(config.code_dim)
        model = cls(config, autoencoder, kept=int(state["kept"]) if "kept" in state else None)
        model.load_state_dict(state)  # strict: a file missing a tensor is an error, not a default
        return model.eval()


def train_code_vae(autoencoder: NefAutoencoder, weights: torch.Tensor, kind: str,
                   config: NefCodeConfig | None = None, progress: bool = True,
                   batch_size: int = 256) -> tuple[NefCodeVAE, dict]:
    """Train a `NefCodeVAE` over ``autoencoder``'s latents of ``weights (b, p)`` (the module doc's steps 1-4);
    ``kind`` as in `decoder_metric`. Returns the model (eval mode, CPU) and its training statistics:
    ``{"kl", "reconstruction_mse", "active_dims", "kept_dims", "code_spread"}`` (the mean KL per training field,
    the mean squared error of the posterior means' reconstructions in the unit-RMS coordinates, the code dimensions
    whose posterior means spread with std > `ACTIVE_SPREAD` over the fields, the dimensions the codes hold, and
    the stds in the codes' order)."""
    from tqdm.auto import trange

    config = config or NefCodeConfig()
    autoencoder = autoencoder.cpu().eval()
    autoencoder.spec.check_weights(weights)
    if len(weights) < 2:
        raise ValueError(f"a NefCodeVAE needs >= 2 training fields, got {len(weights)}")
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(part.float()) for part in weights.split(batch_size)])
    metric = decoder_metric(autoencoder, kind, latents, config.metric_items, config.metric_step, config.seed,
                            progress=progress)
    model = NefCodeVAE(config, autoencoder, *shape_weighted_frame(metric, latents))
    y = model.to_coordinates(latents)
    with torch.random.fork_rng():  # a seeded initialisation that leaves the caller's global RNG alone
        torch.manual_seed(config.seed)
        model.encoder.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        model.decoder.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    parameters = [*model.encoder.parameters(), *model.decoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    bar = trange(config.steps, desc="code VAE", unit="step", mininterval=1.0, disable=not progress)
    for _ in bar:
        batch = y[torch.randint(0, len(y), (config.batch_size,), generator=generator)]
        mean, log_var = model.encoder(batch).chunk(2, -1)
        code = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator)
        reconstruction = ((model.decoder(code) - batch) ** 2).sum(1) / (2 * config.sigma2)
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1 - log_var).sum(1)
        loss = (reconstruction + kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        mean, log_var = model.encoder(y).chunk(2, -1)
        spread = mean.std(0)
        if config.sort_codes or config.drop_inactive:
            model.order.copy_(spread.argsort(descending=True))
        if config.drop_inactive:  # the dimensions in use, padded with the next ones to whole chunks
            w = config.chunk_width
            model.kept.fill_(min(config.code_dim, max(w, -(-int((spread > ACTIVE_SPREAD).sum()) // w) * w)))
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1 - log_var).sum(1).mean()
        error = ((model.decoder(mean) - y) ** 2).mean()
    stats = {"kl": float(kl), "reconstruction_mse": float(error),
             "active_dims": int((spread > ACTIVE_SPREAD).sum()), "kept_dims": model.code_length,
             "code_spread": [round(float(v), 4) for v in spread[model.order]]}
    return model, stats


@torch.no_grad()
def posterior_draws(model: NefCodeVAE, weights: torch.Tensor, draws: int, seed: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """``(draws * b, t, w)`` codes of ``weights (b, p)``: ``draws`` rounds of one draw from q(code | field) per
    field (round r holds rows r*b .. r*b + b-1, in the fields' order); ``draws=0``: the posterior means
    ``(b, t, w)``."""
    y = torch.cat([model.to_coordinates(model.autoencoder.encode(part.float())) for part in weights.split(batch_size)])
    mean, log_var = model.posterior(y)
    mean, log_var = mean[:, :model.code_length], log_var[:, :model.code_length]
    if draws == 0:
        codes = mean
    else:
        generator = torch.Generator().manual_seed(seed)
        codes = torch.cat([mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator)
                           for _ in range(draws)])
    return codes.view(len(codes), model.num_tokens, model.chunk_width)


def decoder_parameters(model: NefCodeVAE) -> list[nn.Parameter]:
    """The parameters that map codes to weights: the VAE's decoder MLP and its autoencoder's decoder (not the
    encoders, whose outputs are the codes a prior was trained on)."""
    autoencoder = model.autoencoder
    return [*model.decoder.parameters(), autoencoder.decoder_position, *autoencoder.decoder_in.parameters(),
            *autoencoder.decoder.parameters(), *autoencoder.decoder_out.parameters()]


def cycle_error(model: NefCodeVAE, codes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Mean squared difference, over the ``active`` code dimensions (a bool mask over the code's numbers), between
    ``codes (b, t, w)`` and the posterior means of the fields they decode to: 0 when the decoder draws, for each
    code, a field the encoders map back to it; large when it draws alike fields for unlike codes."""
    codes = model.check_codes(codes)
    return _cycle_error(model, codes, model.decode(codes), active)


def _cycle_error(model: NefCodeVAE, codes: torch.Tensor, decoded: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return ((model.encode(decoded) - codes).flatten(1) ** 2)[:, active].mean()


def field_mmd(samples: torch.Tensor, references: torch.Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0)
              ) -> torch.Tensor:
    """Unbiased squared MMD between two sets of fields given by their values at the same points,
    ``samples (m, ...)`` and ``references (r, ...)`` (m, r >= 2; e.g. ``(m, n, out_dim)`` from `siren_forward`),
    with a sum of Gaussian kernels ``exp(-d / (s * h))`` on the mean squared difference ``d`` of two fields, ``h``
    the median ``d`` over all pairs (held fixed for the gradient) and ``s`` in ``scales``. About 0 when both sets
    come from one distribution; its gradient pulls samples towards the references and apart from one another (the
    repulsion is what un-bunches a decoder that draws alike fields)."""
    if samples.ndim < 2 or samples.shape[1:] != references.shape[1:]:
        raise ValueError(f"samples (m, ...) and references (r, ...) with the same values per field (the same points) "
                         f"are needed, got {tuple(samples.shape)} and {tuple(references.shape)}")
    samples, references = samples.flatten(1), references.flatten(1)
    if len(samples) < 2 or len(references) < 2:
        raise ValueError(f"at least 2 samples and 2 references are needed, got {len(samples)} and {len(references)}")
    both = torch.cat([samples, references])
    distances = torch.cdist(both, both).pow(2) / both.shape[1]
    m = len(samples)
    off = ~torch.eye(len(both), dtype=torch.bool, device=both.device)
    h = distances.detach()[off].median().clamp_min(1e-12)
    kernel = sum(torch.exp(-distances / (s * h)) for s in scales)
    xx, yy, xy = kernel[:m, :m], kernel[m:, m:], kernel[:m, m:]
    r = len(references)
    return ((xx.sum() - xx.diagonal().sum()) / (m * (m - 1)) + (yy.sum() - yy.diagonal().sum()) / (r * (r - 1))
            - 2 * xy.mean())


def tune_decoder_to_prior(model: NefCodeVAE, weights: torch.Tensor, prior_codes: torch.Tensor, coords: torch.Tensor,
                          epochs: int = 20, cycle_weight: float = 0.1, lr: float = 1e-4, batch_size: int = 16,
                          points_per_step: int | None = None, seed: int = 0, progress: bool = True,
                          mmd_weight: float = 0.0) -> dict:
    """Fine-tune ``model``'s decoders (in place; `decoder_parameters`) for the codes a prior draws, not only for the
    training fields' own (RESULTS.md, session 16). Decoders trained only on the training fields' posteriors draw
    alike, average fields for the new codes a prior samples between them, so its samples bunch.

    Each step adds two terms:
    - reconstruction: a batch of ``weights (b, p)`` (the training fields) drawn from their posteriors and decoded,
      compared with the fields themselves on ``coords (n, in_dim)`` (or ``points_per_step`` of them, drawn afresh)
      by the autoencoder's function loss (occupancy KL or MSE), as the decoders were trained;
    - cycle: ``cycle_weight`` × `cycle_error` of a batch of ``prior_codes (m, t, w)`` (codes a prior drew, e.g.
      NefGPT's samples) over the code dimensions in use (the training fields' posterior means spread with std >
      `ACTIVE_SPREAD`): each prior code must decode to a field the fixed encoders map back to it.

    With ``mmd_weight > 0`` a third term: ``mmd_weight`` × `field_mmd` between the prior batch's decoded fields and
    the reconstruction batch's training fields at the step's points (occupancy probabilities for shapes), a realism
    term on the prior's samples themselves: it pulls their distribution towards the training fields' and pushes
    alike samples apart. On the chairs (weight 1) it took NefGPT's draws from 1-NNA 70.1 % to 66.2 % at T 1.3 and
    from 73.3 % to 68.1 % at T 1.0, for a little fidelity (RESULTS.md, session 17).

    The encoders do not change, so the training fields' codes, and a prior trained on them, stay valid.
    Returns ``{"reconstruction": [...], "cycle": [...], "mmd": [...]}`` (each epoch's mean terms) and
    ``"active_dims"``.
    """
    from tqdm.auto import tqdm

    from ..fields.siren import siren_forward
    from .learned import occupancy_kl

    model.spec.check_weights(weights)
    prior_codes = model.check_codes(prior_codes).float()
    if epochs < 1 or batch_size < 1 or not lr > 0 or not cycle_weight >= 0 or not mmd_weight >= 0:
        raise ValueError(f"epochs >= 1, batch_size >= 1, lr > 0, cycle_weight >= 0 and mmd_weight >= 0 are needed, "
                         f"got {epochs}, {batch_size}, {lr}, {cycle_weight}, {mmd_weight}")
    if mmd_weight > 0 and (batch_size < 2 or len(weights) < 2):
        raise ValueError(f"mmd_weight > 0 compares batches: batch_size and the number of fields must be >= 2, got "
                         f"{batch_size} and {len(weights)}")
    if coords.ndim != 2 or coords.shape[1] != model.spec.in_dim:
        raise ValueError(f"coords must be (n, {model.spec.in_dim}) points of the fields' domain, got "
                         f"{tuple(coords.shape)}")
    if points_per_step is not None and not 1 <= points_per_step <= len(coords):
        raise ValueError(f"points_per_step must be in [1, {len(coords)}] (the coordinate pool), got {points_per_step}")
    device = next(model.parameters()).device  # the model's device; the seeded draws stay on the CPU's generator
    weights, coords, prior_codes = weights.float().to(device), coords.float().to(device), prior_codes.to(device)
    model.eval()  # no dropout anywhere; the encoders stay fixed
    with torch.no_grad():
        y = torch.cat([model.to_coordinates(model.autoencoder.encode(part)) for part in weights.split(256)])
        mean, log_var = model.posterior(y)
    std = (0.5 * log_var).exp()
    active = mean[:, :model.code_length].std(0) > ACTIVE_SPREAD
    if not active.any():
        raise ValueError("no code dimension is in use (the training fields' codes do not spread): nothing to tune")
    kl = model.autoencoder.config.function_loss == "kl"
    parameters = decoder_parameters(model)
    states = [(p, p.requires_grad) for p in model.parameters()]  # given back afterwards
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in parameters))
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = {"reconstruction": [], "cycle": [], "mmd": [], "active_dims": int(active.sum())}
    steps_per_epoch = -(-len(weights) // batch_size)
    bar = tqdm(total=epochs * steps_per_epoch, desc="tuning the decoders to the prior", disable=not progress)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(weights), generator=generator)
            sums, seen = [0.0, 0.0, 0.0], 0
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                if len(rows) < 2 and mmd_weight > 0:  # one field left over has no MMD: skipped this epoch (the
                    continue                            # order is drawn afresh each epoch)
                code = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator).to(device)
                points = coords if points_per_step is None else \
                    coords[torch.randperm(len(coords), generator=generator)[:points_per_step]]
                with torch.no_grad():
                    target = siren_forward(model.spec, weights[rows], points)
                output = siren_forward(model.spec, model.decode(code[:, :model.code_length]), points)
                reconstruction = occupancy_kl(output, target) if kl else ((output - target) ** 2).mean()
                drawn = prior_codes[torch.randint(len(prior_codes), (len(rows),), generator=generator)]
                zero = reconstruction.new_zeros(())
                decoded = model.decode(drawn) if cycle_weight > 0 or mmd_weight > 0 else None
                cycle = _cycle_error(model, drawn, decoded, active) if cycle_weight > 0 else zero
                mmd = zero
                if mmd_weight > 0:
                    values = siren_forward(model.spec, decoded, points)
                    mmd = field_mmd(torch.sigmoid(values), torch.sigmoid(target)) if kl else field_mmd(values, target)
                loss = reconstruction + cycle_weight * cycle + mmd_weight * mmd
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                sums[0] += float(reconstruction.detach()) * len(rows)
                sums[1] += float(cycle.detach()) * len(rows)
                sums[2] += float(mmd.detach()) * len(rows)
                seen += len(rows)
                bar.update(1)
            for name, total in zip(("reconstruction", "cycle", "mmd"), sums):
                history[name].append(total / seen)
            bar.set_postfix(reconstruction=f"{history['reconstruction'][-1]:.3g}", cycle=f"{history['cycle'][-1]:.3g}",
                            **({"mmd": f"{history['mmd'][-1]:.3g}"} if mmd_weight > 0 else {}))
    finally:
        bar.close()
        for p, state in states:
            p.requires_grad_(state)
    model.eval()
    return history


__all__ = ["NefCodeConfig", "NefCodeVAE", "cycle_error", "decoder_metric", "decoder_parameters", "field_mmd",
           "posterior_draws", "shape_weighted_frame", "train_code_vae", "tune_decoder_to_prior"]
