"""Set-level metrics of a generator: MMD, COV and 1-NNA (HyperDiffusion / PointFlow), a memorisation ratio, and
the Fréchet distance of classifier features.

Definitions (HyperDiffusion's ``evaluation_metrics_3d.py``: ``lgan_mmd_cov`` and ``knn(..., k=1)``; ANCHORS.md),
with ``S`` the generated samples, ``R`` the reference (real, held-out) items and ``D`` a distance matrix:

- **MMD** = mean over references of the distance to their nearest sample, ``mean_r min_s D[s, r]`` (lower is
  better: every real item has a close sample).
- **COV** = share of references that are the nearest reference of at least one sample,
  ``|{argmin_r D[s, r] : s in S}| / |R|`` (higher is better; mode collapse lowers it).
- **1-NNA** = leave-one-out accuracy of the 1-nearest-neighbour classifier that tells samples from references
  on ``R ∪ S`` (each item is classified by the set of its nearest *other* item). 0.5 is ideal (the sets are
  indistinguishable); 1.0 means every item's nearest neighbour comes from its own set (samples are far from
  real items or collapsed); below 0.5 means samples sit right on top of references (copies): identical sets
  give exactly 0.0, because every item's nearest other item is its twin in the other set.

Ties, chosen deliberately (HyperDiffusion takes whatever ``torch.topk``/``torch.min`` returns, which is
implementation-defined for 1-NNA ties):

- 1-NNA: when several items are at the same smallest distance, the item scores the share of them that carry
  its own label, the expected accuracy under a uniformly random tie-break. Without ties (the usual case for
  real-valued data) this is HyperDiffusion's number; with duplicates it is symmetric in ``S`` and ``R`` and does
  not depend on the order of the items. Ties are exact equalities; `distances` reports identical items at
  distance exactly 0, so duplicates do tie.
- COV: a sample equidistant to several references covers the first of them (lowest index), as ``torch.min``.

``|S| = |R|`` is the protocol (1-NNA's 0.5 ideal and COV's scale assume it): other sizes raise unless
``allow_unequal=True``.

Axis legend: ``s`` samples, ``r`` references, ``t`` training items, ``d`` features.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.linalg
import torch

logger = logging.getLogger(__name__)

MODALITIES = ("image", "points")


# ------------------------------------------------------------------------------------------- helpers
def _as_matrix(values, name: str, allow_inf: bool = False) -> np.ndarray:
    """A float64 matrix of distances >= 0; ``allow_inf``: ``+inf`` marks a pair known not to be a minimum."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {matrix.shape}")
    if matrix.size == 0:
        raise ValueError(f"{name} is empty (shape {matrix.shape}): the sets must not be empty")
    bad = ~(np.isfinite(matrix) | (allow_inf & (matrix == np.inf)))
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}[{row}, {col}] is {matrix[row, col]} ({int(bad.sum())} non-finite entries); "
                         f"distances must be finite" + (" or +inf" if allow_inf else ""))
    if (matrix < 0).any():
        row, col = (int(v) for v in np.argwhere(matrix < 0)[0])
        raise ValueError(f"{name}[{row}, {col}] = {matrix[row, col]:.4g} is negative; distances must be >= 0")
    return matrix


def _as_features(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    features = np.asarray(values, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) feature matrix, got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(f"{name} has {len(features)} rows; a covariance needs at least 2 feature vectors")
    bad = ~np.isfinite(features).all(1)
    if bad.any():
        raise ValueError(f"{name}[{int(np.flatnonzero(bad)[0])}] contains NaN or inf")
    return features


# ------------------------------------------------------------------------------------------- MMD, COV, 1-NNA
def one_nn_accuracy(distances: np.ndarray, labels: np.ndarray, chunk_rows: int = 1024) -> np.ndarray:
    """Leave-one-out 1-NN correctness of every item of a square distance matrix, ties shared (module docstring).

    Args:
        distances: ``(k, k)`` distances between all items; the diagonal is ignored.
        labels: ``(k,)`` the set of each item.

    Returns:
        ``(k,)`` float64 in ``[0, 1]``: 1 when the item's nearest other item has its label, the share of such
        items among the nearest when several tie.
    """
    scores = np.empty(len(distances))
    for start in range(0, len(distances), chunk_rows):
        block = distances[start:start + chunk_rows].copy()  # (c, k)
        rows = np.arange(len(block))
        block[rows, start + rows] = np.inf  # leave one out
        nearest = block == block.min(1, keepdims=True)  # (c, k) the tied nearest items
        same = nearest & (labels[None, :] == labels[start:start + len(block), None])
        scores[start:start + len(block)] = same.sum(1) / nearest.sum(1)
    return scores


def mmd_cov_1nna(dist_sr, dist_ss, dist_rr, *, allow_unequal: bool = False, allow_inf: bool = False) -> dict[str, float]:
    """MMD, COV and 1-NNA from the three distance matrices of a sample set ``S`` and a reference set ``R``.

    Args:
        dist_sr: ``(s, r)`` distances, samples (rows) to references (columns).
        dist_ss: ``(s, s)`` distances within the samples.
        dist_rr: ``(r, r)`` distances within the references.
        allow_unequal: accept ``s != r`` (off-protocol; 1-NNA's ideal is then not 0.5).
        allow_inf: accept ``+inf`` for pairs proven to be nobody's nearest (`chamfer_nearest_matrices`); the
            minima the metrics read must still be finite.

    Returns:
        ``{"mmd", "cov", "one_nna", "one_nna_samples", "one_nna_references"}`` as floats, COV and the 1-NNA
        values as fractions in ``[0, 1]``; ``one_nna_samples`` / ``one_nna_references`` are the 1-NN accuracies
        on each set alone (HyperDiffusion's ``acc_f`` / ``acc_t``).

    Example:
        >>> import numpy as np
        >>> d = np.array([[0.0, 4.0], [4.0, 0.0]])  # two items, far apart
        >>> mmd_cov_1nna(d, d, d)["one_nna"]  # samples identical to the references: copies
        0.0
    """
    dist_sr = _as_matrix(dist_sr, "dist_sr", allow_inf)
    dist_ss = _as_matrix(dist_ss, "dist_ss", allow_inf)
    dist_rr = _as_matrix(dist_rr, "dist_rr", allow_inf)
    num_samples, num_references = dist_sr.shape
    if dist_ss.shape != (num_samples, num_samples):
        raise ValueError(f"dist_ss must be ({num_samples}, {num_samples}) for the {num_samples} samples of dist_sr "
                         f"(rows = samples), got {dist_ss.shape}")
    if dist_rr.shape != (num_references, num_references):
        raise ValueError(f"dist_rr must be ({num_references}, {num_references}) for the {num_references} references "
                         f"of dist_sr (columns = references), got {dist_rr.shape}")
    if num_samples != num_references and not allow_unequal:
        raise ValueError(f"the protocol compares as many samples as references, got {num_samples} samples and "
                         f"{num_references} references; sample |R| = {num_references} items, or pass "
                         f"allow_unequal=True (then 1-NNA's ideal is no longer 0.5)")

    if allow_inf:
        for name, nearest in (("dist_sr", dist_sr.min(axis=0)), ("dist_sr", dist_sr.min(axis=1))):
            if not np.isfinite(nearest).all():
                raise ValueError(f"{name} has a row or column with no finite distance: its minimum is unknown")
    mmd = float(dist_sr.min(axis=0).mean())  # mean over references of the nearest sample
    cov = float(np.unique(dist_sr.argmin(axis=1)).size / num_references)  # argmin: first index on ties

    # R ∪ S in HyperDiffusion's order (references first): [[R-R, R-S], [S-R, S-S]].
    union = np.block([[dist_rr, dist_sr.T], [dist_sr, dist_ss]])  # (r + s, r + s)
    labels = np.concatenate([np.ones(num_references), np.zeros(num_samples)])
    correct = one_nn_accuracy(union, labels)
    return {
        "mmd": mmd,
        "cov": cov,
        "one_nna": float(correct.mean()),
        "one_nna_samples": float(correct[num_references:].mean()),
        "one_nna_references": float(correct[:num_references].mean()),
    }


def memorisation_ratio(samples_to_train, heldout_to_train, *, allow_inf: bool = False) -> float:
    """Median nearest-training distance of the samples divided by that of held-out real items.

    Args:
        samples_to_train: ``(s, t)`` distances from each sample to each training item.
        heldout_to_train: ``(h, t)`` distances from each held-out real item to the same training items.
        allow_inf: accept ``+inf`` for pairs proven not to be a row's minimum (``chamfer_distance_matrix(...,
            nearest_only=True)``).

    Returns:
        The ratio: about 1 when samples are as far from the training set as new real data is; well below 1
        when samples copy training items (ISSUE 5's target: >= 0.9).
    """
    samples_to_train = _as_matrix(samples_to_train, "samples_to_train", allow_inf)
    heldout_to_train = _as_matrix(heldout_to_train, "heldout_to_train", allow_inf)
    if samples_to_train.shape[1] != heldout_to_train.shape[1]:
        raise ValueError(f"both matrices need the same training items as columns, got {samples_to_train.shape[1]} "
                         f"(samples_to_train) and {heldout_to_train.shape[1]} (heldout_to_train)")
    heldout = float(np.median(heldout_to_train.min(axis=1)))
    if heldout == 0.0:
        raise ValueError("the held-out items' median distance to their nearest training item is 0: the held-out set "
                         "overlaps the training set, so the ratio is undefined; use a disjoint held-out split")
    return float(np.median(samples_to_train.min(axis=1))) / heldout


# ------------------------------------------------------------------------------------------- Fréchet distance
def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians fitted to feature sets (FID / FPD), in float64.

    ``|mu_a - mu_b|² + Tr(C_a + C_b - 2 (C_a C_b)^½)`` with unbiased covariances. The matrix square root is
    ``scipy.linalg.sqrtm``; when it is not finite (singular covariances, e.g. fewer items than feature
    dimensions) ``eps`` is added to both diagonals, and imaginary parts from round-off are dropped (a
    significant imaginary part raises). Negative round-off (identical sets) is returned as 0.

    Args:
        feats_a: ``(n, d)`` features of one set.
        feats_b: ``(m, d)`` features of the other.
    """
    feats_a = _as_features(feats_a, "feats_a")
    feats_b = _as_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a has {feats_a.shape[1]}, feats_b has {feats_b.shape[1]}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))  # (d, d)
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: singular covariance product (%d and %d items for %d features); adding %g "
                       "to the diagonals", len(feats_a), len(feats_b), feats_a.shape[1], eps)
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"Fréchet distance: the covariance square root has an imaginary part of {imaginary:.3g} "
                             f"(numerically unstable covariances; use more items or fewer feature dimensions)")
        covmean = covmean.real
    diff = mu_a - mu_b
    distance = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(distance, 0.0)


# ------------------------------------------------------------------------------------------- all at once
def pairwise_distances(items_a, items_b=None, *, modality: str, device=None, progress: bool | None = None):
    """The distance of a modality: mean squared pixel difference (``"image"``) or squared-L2 Chamfer on the
    clouds as given (``"points"``; normalise first). ``(a, b)`` float64 tensor; ``items_b=None`` within ``a``."""
    from .distances import chamfer_distance_matrix, image_distance_matrix

    if modality == "image":
        return image_distance_matrix(items_a, items_b, device=device, progress=progress)
    if modality == "points":
        return chamfer_distance_matrix(items_a, items_b, device=device, progress=progress)
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")


def generation_metrics(
    predictions,
    references,
    *,
    modality: str = "image",
    feature_net: Any = None,
    train_items=None,
    normalize: bool = True,
    allow_unequal: bool = False,
    device=None,
    progress: bool | None = None,
) -> dict[str, float]:
    """MMD, COV, 1-NNA (and optionally FD and the memorisation ratio) of generated items against references.

    Args:
        predictions: generated items: images ``(s, H, W[, C])`` or point clouds ``(s, n, 3)`` (or lists).
        references: real held-out items of the same kind.
        modality: ``"image"`` or ``"points"``.
        feature_net: a trained `ImageFeatureNet` / `PointNetFeatureNet`, or the path of one saved with ``save``:
            adds ``"fd"``, the Fréchet distance of its features (FID-style for images, FPD for clouds).
        train_items: the training items: adds ``"memorisation_ratio"`` (`memorisation_ratio` of the samples
            against the references, both to the training items).
        normalize: normalise each point cloud (`normalize_point_clouds`, HyperDiffusion) before Chamfer.
        allow_unequal: accept ``len(predictions) != len(references)``.
        device: where distances and features are computed.

    Returns:
        ``{"mmd", "cov", "one_nna", "one_nna_samples", "one_nna_references"[, "fd"][, "memorisation_ratio"]}``.
    """
    from .distances import as_images, as_point_clouds, normalize_point_clouds

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality == "image":
        samples, refs = as_images(predictions, "predictions"), as_images(references, "references")
        if samples.shape[1:] != refs.shape[1:]:
            raise ValueError(f"mismatched image shapes: predictions are {tuple(samples.shape[1:])} (H, W, C) but "
                             f"references are {tuple(refs.shape[1:])}")
        train = None if train_items is None else as_images(train_items, "train_items")
    else:
        prepare = normalize_point_clouds if normalize else as_point_clouds
        samples, refs = prepare(predictions, "predictions"), prepare(references, "references")
        train = None if train_items is None else prepare(train_items, "train_items")
    if len(samples) != len(refs) and not allow_unequal:  # fail before the costly distances
        raise ValueError(f"the protocol compares as many samples as references, got {len(samples)} predictions and "
                         f"{len(refs)} references; pass allow_unequal=True to compare anyway")

    distance = lambda a, b=None: pairwise_distances(a, b, modality=modality, device=device, progress=progress)  # noqa: E731
    if modality == "points":  # only the minima the metrics read (exact; the rest may be inf)
        from .distances import chamfer_distance_matrix, chamfer_nearest_matrices

        results = mmd_cov_1nna(*chamfer_nearest_matrices(samples, refs, device=device, progress=progress),
                               allow_unequal=allow_unequal, allow_inf=True)
        distance = lambda a, b: chamfer_distance_matrix(a, b, device=device, progress=progress,  # noqa: E731
                                                        nearest_only=True)
    else:
        results = mmd_cov_1nna(distance(samples, refs), distance(samples), distance(refs),
                               allow_unequal=allow_unequal)
    if feature_net is not None:
        from .features import load_feature_net

        net = load_feature_net(feature_net) if not hasattr(feature_net, "features") else feature_net
        raw_samples = samples if modality == "image" else as_point_clouds(predictions, "predictions")
        raw_refs = refs if modality == "image" else as_point_clouds(references, "references")
        results["fd"] = frechet_distance(net.features(raw_samples, device=device),
                                         net.features(raw_refs, device=device))
    if train is not None:
        results["memorisation_ratio"] = memorisation_ratio(distance(samples, train), distance(refs, train),
                                                           allow_inf=modality == "points")
    return results


__all__ = ["frechet_distance", "generation_metrics", "memorisation_ratio", "mmd_cov_1nna", "one_nn_accuracy",
           "pairwise_distances"]
