"""Residual vector quantisation of weight chunks: k-means init, EMA codebook updates, dead-code restarts.

Residual VQ: Zeghidour et al., "SoundStream", https://arxiv.org/abs/2107.03312 (Algorithm 1); as MeshGPT uses
it (Siddiqui et al., https://arxiv.org/abs/2311.15475; lucidrains/vector-quantize-pytorch is the style
reference): level ``q`` quantises what levels ``0..q-1`` left over, its codebook is initialised by k-means on
those residuals, then follows the running (EMA) mean of the vectors assigned to each code; a code whose EMA
count falls below ``dead_code_threshold`` is restarted on a random vector of the current batch.

Two things differ from a plain RVQ, both because chunks of a neural field are zero-padded to one width:

- a **mask** says which entries of a vector are real; distances and means use only those, so a short chunk
  (the first layer's ``in + 1`` values) never pays for its padding and never drags codes towards zero;
- vectors come in **groups** (e.g. one per layer), each with its own codebooks and its own number of levels
  (``levels_per_group``), so a wide layer may get more levels than a narrow one.

Axis legend: ``n`` vectors, ``d`` vector width, ``q`` levels, ``g`` groups, ``k`` codes.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Rows of the (n, k) distance matrix computed at once: bounds memory at rows * k * 4 bytes.
DISTANCE_ROWS = 4096


# ------------------------------------------------------------------------------------------------ helpers
def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if exists(value) else fallback


def masked_nearest(x: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code of each vector, distance counted on the masked entries only.

    ``Σ_j m_j (x_j - c_j)² = Σ m x² - 2 x·c + m·c²`` with ``x`` zero where masked, so two matmuls suffice.

    Args:
        x: ``(n, d)`` zero where ``mask`` is False.  mask: ``(n, d)`` float or bool.  codebook: ``(k, d)``.
    Returns:
        ``(n,)`` long.
    """
    if codebook.shape[1] == 1:
        return _nearest_1d(x[:, 0], codebook[:, 0])
    mask = mask.to(x.dtype)
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    squared = codebook.square().t()  # (d, k)
    doubled = 2.0 * codebook.t()
    for start in range(0, x.shape[0], DISTANCE_ROWS):
        rows = slice(start, start + DISTANCE_ROWS)
        distance = mask[rows] @ squared - x[rows] @ doubled  # (n, k) up to the per-row constant Σ m x²
        codes[rows] = distance.argmin(dim=1)
    return codes


def _nearest_1d(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest scalar code by binary search in the sorted codebook: ``O(n log k)`` instead of ``O(n k)``
    (per-scalar tokens: 5.9 M scalars for 5,000 MNIST fields). Ties go to the lower code value."""
    sorted_codes, order = torch.sort(codebook)
    right = torch.searchsorted(sorted_codes, values.contiguous()).clamp_(max=sorted_codes.numel() - 1)
    left = (right - 1).clamp_(min=0)
    take_left = (values - sorted_codes[left]).abs() <= (sorted_codes[right] - values).abs()
    return order[torch.where(take_left, left, right)]


def masked_kmeans(x: torch.Tensor, mask: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator,
                  eps: float = 1e-8) -> torch.Tensor:
    """Lloyd's k-means with masked distances and per-entry means, seeded by k-means++ (Arthur & Vassilvitskii
    2007: each new seed drawn with probability ∝ squared distance to the nearest seed so far, which keeps two
    seeds from sharing a cluster); empty clusters restart on random vectors.

    Returns ``(k, d)`` centroids (``k`` may exceed ``n``: the extra codes repeat data points).
    """
    num = x.shape[0]
    maskf = mask.to(x.dtype)
    if num <= num_codes:
        pick = torch.cat([torch.arange(num), torch.randint(num, (num_codes - num,), generator=generator)])
        centroids = x[pick].clone()
    else:
        # Seeding costs k passes over its sample: a sample of 4k vectors keeps it cheap; Lloyd then uses all.
        seed_rows = torch.randperm(num, generator=generator)[: max(4 * num_codes, 4096)]
        sample, sample_mask = x[seed_rows], maskf[seed_rows]
        centroids = torch.empty(num_codes, x.shape[1], dtype=x.dtype)
        centroids[0] = sample[0]
        nearest = ((sample - centroids[0]) ** 2 * sample_mask).sum(1)
        for k in range(1, num_codes):
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
            centroids[k] = sample[torch.multinomial(weights, 1, generator=generator)]
            nearest = torch.minimum(nearest, ((sample - centroids[k]) ** 2 * sample_mask).sum(1))
    for _ in range(iters):
        codes = masked_nearest(x, maskf, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        counts = torch.zeros_like(centroids).index_add_(0, codes, maskf)
        filled = counts > 0
        centroids = torch.where(filled, sums / counts.clamp_min(eps), centroids)
        empty = ~filled.any(dim=1)
        if empty.any():
            centroids[empty] = x[torch.randint(num, (int(empty.sum()),), generator=generator)]
    return centroids


def perplexity(codes: torch.Tensor, num_codes: int) -> float:
    """``exp(entropy)`` of the code histogram (``num_codes`` at best, 1 when one code takes all)."""
    if codes.numel() == 0:
        return float("nan")
    probs = torch.bincount(codes.flatten(), minlength=num_codes).double() / codes.numel()
    probs = probs[probs > 0]
    return float(torch.exp(-(probs * probs.log()).sum()))


# ------------------------------------------------------------------------------------------------ module
class ResidualVQ(nn.Module):
    """Masked, grouped residual VQ with EMA codebooks.

    Args:
        dim (`int`): width ``d`` of the vectors (padding included).
        codebook_size (`int`, *optional*, defaults to 1024): codes ``k`` per codebook.
        levels_per_group (`Sequence[int]`, *optional*, defaults to ``(3,)``): residual levels of each group;
            its length is the number of groups ``g``. Every (group, level) pair has its own codebook.
        decay (`float`, *optional*, defaults to 0.99): EMA decay of the codebook statistics (MeshGPT's value).
        kmeans_iters (`int`, *optional*, defaults to 10): Lloyd iterations of the k-means initialisation.
        dead_code_threshold (`float`, *optional*, defaults to 1.0): a code whose EMA count (vectors per batch)
            falls below this is restarted on a random vector of the batch.
        eps (`float`, *optional*, defaults to 1e-5): Laplace smoothing of the EMA counts.
    """

    def __init__(self, dim: int, codebook_size: int = 1024, levels_per_group: Sequence[int] = (3,),
                 decay: float = 0.99, kmeans_iters: int = 10, dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        levels_per_group = [int(v) for v in levels_per_group]
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if not levels_per_group or min(levels_per_group) < 1:
            raise ValueError(f"levels_per_group must list >= 1 level for every group, got {levels_per_group}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.dim, self.codebook_size = dim, codebook_size
        self.levels_per_group = levels_per_group
        self.decay, self.kmeans_iters, self.dead_code_threshold, self.eps = decay, kmeans_iters, dead_code_threshold, eps
        shape = (self.num_levels, self.num_groups, codebook_size, dim)
        self.register_buffer("codebooks", torch.zeros(shape))
        self.register_buffer("ema_counts", torch.zeros(shape))  # per entry: masks make counts differ by entry
        self.register_buffer("ema_sums", torch.zeros(shape))
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))

    @property
    def num_groups(self) -> int:
        return len(self.levels_per_group)

    @property
    def num_levels(self) -> int:
        """Most levels of any group (``q``)."""
        return max(self.levels_per_group)

    def _level_groups(self, level: int) -> list[int]:
        return [g for g, levels in enumerate(self.levels_per_group) if level < levels]

    def _check(self, x: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {tuple(x.shape)} do not fit this quantizer: expected (n, {self.dim})")
        if mask.shape != x.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match vectors of shape {tuple(x.shape)}")
        if groups.shape != (x.shape[0],):
            raise ValueError(f"groups of shape {tuple(groups.shape)} do not match {x.shape[0]} vectors")
        if groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups):
            raise ValueError(f"group ids must lie in 0..{self.num_groups - 1}, got {groups.min()}..{groups.max()}")

    # ------------------------------------------------------------------------------------------ quantise
    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` vectors -> ``(n, q)`` codes; ``-1`` at the levels a vector's group does not have."""
        self._check(x, mask, groups)
        if not bool(self.initted):
            raise RuntimeError("this quantizer has not been trained: call fit() first")
        x = x.to(self.codebooks.dtype)
        maskf = mask.to(x.dtype)
        residual = x * maskf
        codes = torch.full((x.shape[0], self.num_levels), -1, dtype=torch.long, device=x.device)
        for level in range(self.num_levels):
            for group in self._level_groups(level):
                rows = torch.nonzero(groups == group).flatten()
                if rows.numel() == 0:
                    continue
                codebook = self.codebooks[level, group]
                chosen = masked_nearest(residual[rows], maskf[rows], codebook)
                codes[rows, level] = chosen
                residual[rows] -= codebook[chosen] * maskf[rows]
        return codes

    def decode(self, codes: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, q)`` codes -> ``(n, d)`` the sum of their codes over levels (``-1`` = no code), zero outside ``mask``."""
        if codes.ndim != 2 or codes.shape[1] != self.num_levels or groups.shape != (codes.shape[0],):
            raise ValueError(f"codes of shape {tuple(codes.shape)} and groups of shape {tuple(groups.shape)} do not "
                             f"fit this quantizer: expected (n, {self.num_levels}) and (n,)")
        out = torch.zeros(codes.shape[0], self.dim, dtype=self.codebooks.dtype, device=codes.device)
        for level in range(self.num_levels):
            present = codes[:, level] >= 0
            if present.any():
                out[present] += self.codebooks[level, groups[present], codes[present, level]]
        return out if mask is None else out * mask.to(out.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(quantized (n, d), codes (n, q))``; ``quantized == decode(codes, groups, mask)``."""
        codes = self.encode(x, mask, groups)
        return self.decode(codes, groups, mask), codes

    # ------------------------------------------------------------------------------------------ training
    @torch.no_grad()
    def _init_kmeans(self, x, maskf, groups, generator, max_points: int, progress) -> None:
        residual = x.clone()
        steps = sum(len(self._level_groups(level)) for level in range(self.num_levels))
        bar = tqdm(total=steps, desc="k-means init", disable=not progress, leave=False)
        for level in range(self.num_levels):
            for group in self._level_groups(level):
                rows = torch.nonzero(groups == group).flatten()
                sample = rows[torch.randperm(rows.numel(), generator=generator)[:max_points]]
                centroids = masked_kmeans(residual[sample], maskf[sample], self.codebook_size, self.kmeans_iters,
                                          generator)
                self.codebooks[level, group] = centroids
                chosen = masked_nearest(residual[rows], maskf[rows], centroids)
                counts = torch.zeros_like(centroids).index_add_(0, chosen, maskf[rows])
                # Statistics scaled to one batch: what the EMA will hold once training runs.
                self.ema_counts[level, group] = counts * self._batch_fraction
                self.ema_sums[level, group] = centroids * self.ema_counts[level, group]
                residual[rows] -= centroids[chosen] * maskf[rows]
                bar.update(1)
        bar.close()
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_step(self, x, maskf, groups, generator) -> int:
        """One EMA update of every codebook on one batch; returns how many dead codes were restarted."""
        residual = x.clone()
        restarted = 0
        for level in range(self.num_levels):
            for group in self._level_groups(level):
                rows = torch.nonzero(groups == group).flatten()
                if rows.numel() == 0:
                    continue
                codebook = self.codebooks[level, group]
                chosen = masked_nearest(residual[rows], maskf[rows], codebook)
                counts = torch.zeros_like(codebook).index_add_(0, chosen, maskf[rows])
                sums = torch.zeros_like(codebook).index_add_(0, chosen, residual[rows])
                ema_counts, ema_sums = self.ema_counts[level, group], self.ema_sums[level, group]
                ema_counts.lerp_(counts, 1.0 - self.decay)
                ema_sums.lerp_(sums, 1.0 - self.decay)
                # Laplace smoothing of the counts keeps rarely used entries finite (lucidrains' EMA codebook).
                totals = ema_counts.sum(0, keepdim=True)
                smoothed = (ema_counts + self.eps) / (totals + self.codebook_size * self.eps) * totals
                updated = ema_sums / smoothed.clamp_min(1e-12)
                # An entry no vector ever filled (padding of every assigned vector) keeps its value.
                codebook.copy_(torch.where(ema_counts > 1e-6, updated, codebook))
                dead = ema_counts.amax(dim=1) < self.dead_code_threshold
                if dead.any():
                    num_dead = int(dead.sum())
                    replacement = rows[torch.randint(rows.numel(), (num_dead,), generator=generator)]
                    codebook[dead] = residual[replacement]
                    ema_counts[dead] = maskf[replacement] * self.dead_code_threshold
                    ema_sums[dead] = residual[replacement] * ema_counts[dead]
                    restarted += num_dead
                residual[rows] -= codebook[chosen] * maskf[rows]
        return restarted

    @torch.no_grad()
    def fit(self, x: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor, epochs: int = 3, batch_size: int = 16384,
            seed: int = 0, kmeans_points: int | None = None, progress: bool = True) -> dict:
        """Train the codebooks: k-means init on a sample, then ``epochs`` passes of EMA updates over shuffled batches.

        Args:
            x, mask, groups: ``(n, d)``, ``(n, d)``, ``(n,)`` every training vector.
            batch_size: vectors per EMA update.
            kmeans_points: vectors per (group, level) used by the k-means init (default ``32 * codebook_size``).
        Returns:
            ``{"restarted": dead codes restarted per epoch}``.
        """
        self._check(x, mask, groups)
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        generator = torch.Generator().manual_seed(seed)
        x = x.to(self.codebooks.dtype)
        maskf = mask.to(x.dtype)
        x = x * maskf
        batch_size = min(batch_size, x.shape[0])
        self._batch_fraction = batch_size / x.shape[0]
        self._init_kmeans(x, maskf, groups, generator, default(kmeans_points, 32 * self.codebook_size), progress)
        restarted = []
        num_batches = math.ceil(x.shape[0] / batch_size)
        bar = tqdm(total=epochs * num_batches, desc="RVQ EMA", disable=not progress, leave=False)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            count = 0
            for start in range(0, x.shape[0], batch_size):
                rows = order[start:start + batch_size]
                count += self._ema_step(x[rows], maskf[rows], groups[rows], generator)
                bar.update(1)
            restarted.append(count)
        bar.close()
        return {"restarted": restarted}

    # ------------------------------------------------------------------------------------------ usage
    def usage(self, codes: torch.Tensor, groups: torch.Tensor) -> dict:
        """Codebook usage of ``codes (n, q)``: share of codes in use and perplexity, over all codebooks and per
        ``(group, level)``."""
        used, total, per_book = 0, 0, {}
        for level in range(self.num_levels):
            for group in self._level_groups(level):
                chosen = codes[groups == group, level]
                in_use = int(torch.unique(chosen).numel())
                used, total = used + in_use, total + self.codebook_size
                per_book[f"group{group}_level{level}"] = {
                    "codes_in_use": in_use / self.codebook_size, "perplexity": perplexity(chosen, self.codebook_size)}
        return {"codes_in_use": used / total, "dead_codes": 1.0 - used / total, "per_codebook": per_book}


__all__ = ["ResidualVQ", "masked_kmeans", "masked_nearest", "perplexity"]
