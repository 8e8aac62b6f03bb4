# Copyright 2025 The nef_transformers authors. Licensed under the Apache License, Version 2.0.
"""nef_generation: MMD, COV, 1-NNA (and optionally the Fréchet distance and a memorisation ratio) of generated
images or point clouds against real ones, with HyperDiffusion's protocol. An `evaluate` wrapper around the plain
functions of `nef_transformers.metrics` (which hold all the math)."""

import datasets
import evaluate
import numpy as np
import torch

from nef_transformers.metrics.generative import MODALITIES, generation_metrics

_CITATION = """\
@inproceedings{erkocc2023hyperdiffusion,
  title={HyperDiffusion: Generating Implicit Neural Fields with Weight-Space Diffusion},
  author={Erko{\\c{c}}, Ziya and Ma, Fangchang and Shan, Qi and Nie{\\ss}ner, Matthias and Dai, Angela},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}
@inproceedings{yang2019pointflow,
  title={PointFlow: 3D Point Cloud Generation with Continuous Normalizing Flows},
  author={Yang, Guandao and Huang, Xun and Hao, Zekun and Liu, Ming-Yu and Belongie, Serge and Hariharan, Bharath},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2019}
}
"""

_DESCRIPTION = """\
Set-level quality of a generator of neural fields, measured on what the fields render: images or point clouds.
Samples (`predictions`) are compared with real held-out items (`references`) through a distance between items:
the mean squared pixel difference for images, the squared-L2 Chamfer distance for point clouds (each cloud
normalised to zero mean and unit std first, as HyperDiffusion). From the three distance matrices (samples to
references, within samples, within references):

- MMD (minimum matching distance): mean over references of the distance to the nearest sample. Lower is better.
- COV (coverage): share of references that are the nearest reference of at least one sample. Higher is better.
- 1-NNA: leave-one-out accuracy of a 1-nearest-neighbour classifier telling samples from references on their
  union. 0.5 is ideal; 1.0 means the sets are told apart; below 0.5 means samples copy references.

With `feature_net_path`, also the Fréchet distance (FID / FPD style) of the features of a small classifier that
`nef_transformers` trains and saves; with `train_items`, the memorisation ratio (median distance of samples to
their nearest training item over that of the references).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated items, as many as `references`: images `(N, H, W)` or `(N, H, W, C)` floating in
        [0, 1] or uint8 in 0..255, or point clouds `(N, n, 3)` (every cloud with the same number of points).
    references: real held-out items of the same kind and shape.
    modality (`str`, *optional*, defaults to `"image"`): `"image"` or `"points"`.
    feature_net_path (`str`, *optional*): folder of a feature net saved by `ImageFeatureNet.save` or
        `PointNetFeatureNet.save`; adds `fd`.
    train_items (*optional*): the training items (same kind); adds `memorisation_ratio`.
    normalize (`bool`, *optional*, defaults to `True`): normalise each point cloud before Chamfer.
    device (`str`, *optional*): where distances and features are computed (`"cpu"`, `"cuda"`).
Returns:
    mmd (`float`): minimum matching distance (per pixel for images; Chamfer for clouds; HyperDiffusion reports
        Chamfer x 10^2).
    cov (`float`): coverage, a fraction in [0, 1].
    one_nna (`float`): 1-NN accuracy, a fraction in [0, 1]; 0.5 is ideal.
    one_nna_samples (`float`), one_nna_references (`float`): the 1-NN accuracy on each set alone.
    fd (`float`, only with `feature_net_path`): Fréchet distance of the classifier features.
    memorisation_ratio (`float`, only with `train_items`): about 1 for new data, well below 1 for copies.
Examples:
    Samples identical to the references are copies: MMD 0, full coverage, 1-NNA 0.

    >>> import evaluate
    >>> import numpy as np
    >>> from nef_transformers.metrics import NEF_GENERATION_METRIC
    >>> metric = evaluate.load(str(NEF_GENERATION_METRIC))
    >>> rng = np.random.default_rng(0)
    >>> real = rng.random((8, 28, 28, 1))
    >>> results = metric.compute(predictions=real, references=real)
    >>> print({name: round(value, 4) for name, value in results.items()})
    {'mmd': 0.0, 'cov': 1.0, 'one_nna': 0.0, 'one_nna_samples': 0.0, 'one_nna_references': 0.0}

    Dark samples are told apart from the real images every time:

    >>> results = metric.compute(predictions=0.1 * real, references=real)
    >>> results["one_nna"]
    1.0

    Point clouds: Gaussian blobs against clouds squashed to a plane (normalisation removes position and scale,
    not shape):

    >>> blobs = rng.normal(size=(6, 256, 3))
    >>> plates = rng.normal(size=(6, 256, 3)) * [1.0, 1.0, 0.01]
    >>> results = metric.compute(predictions=plates, references=blobs, modality="points")
    >>> results["one_nna"], results["cov"] <= 1.0
    (1.0, True)
"""


def _unit_range(items):
    """uint8 images -> floats in [0, 1] before `evaluate` stores them (its float64 column would keep 0..255)."""
    if isinstance(items, torch.Tensor) and items.dtype == torch.uint8:
        return items.double().div(255.0).numpy()
    if isinstance(items, np.ndarray) and items.dtype == np.uint8:
        return items.astype(np.float64) / 255.0
    if isinstance(items, (list, tuple)) and items and all(np.asarray(item).dtype == np.uint8 for item in items):
        return [np.asarray(item, dtype=np.float64) / 255.0 for item in items]
    return items


def _nested(depth: int) -> datasets.Features:
    value = datasets.Value("float64")
    for _ in range(depth):
        value = datasets.List(value)
    return datasets.Features({"predictions": value, "references": value})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NefGeneration(evaluate.Metric):
    """MMD / COV / 1-NNA / FD of generated images or point clouds (see `_DESCRIPTION`)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # (N, H, W, C) images, or (N, H, W) images and (N, n, 3) point clouds: one nesting level less.
            features=[_nested(3), _nested(2)],
            reference_urls=[
                "https://github.com/Rgtemze/HyperDiffusion/blob/main/evaluation_metrics_3d.py",
                "https://arxiv.org/abs/2303.17015",
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of samples and references (uint8 images are scaled to [0, 1] first)."""
        return super().add_batch(predictions=_unit_range(predictions), references=_unit_range(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one sample and one reference (uint8 images are scaled to [0, 1] first)."""
        return super().add(prediction=_unit_range(prediction), reference=_unit_range(reference), **kwargs)

    def _compute(self, predictions, references, modality="image", feature_net_path=None, train_items=None,
                 normalize=True, device=None):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return generation_metrics(
            predictions,
            references,
            modality=modality,
            feature_net=feature_net_path,
            train_items=None if train_items is None else _unit_range(train_items),
            normalize=normalize,
            device=device,
        )
