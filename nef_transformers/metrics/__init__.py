"""Evaluation of generated fields: pairwise distances (Chamfer, pixel L2), MMD / COV / 1-NNA, the memorisation
ratio, Fréchet distances on the features of small trained classifiers, and the ``nef_generation`` `evaluate`
module (``evaluate.load(str(NEF_GENERATION_METRIC))``).

`import evaluate` costs seconds, so the math lives in plain functions here and the module only wraps them.
"""

from pathlib import Path

from .distances import (
    as_images,
    as_point_clouds,
    chamfer_distance_matrix,
    chamfer_nearest_matrices,
    image_distance_matrix,
    normalize_point_clouds,
)
from .features import FeatureNetTraining, ImageFeatureNet, PointNetFeatureNet, load_feature_net, train_feature_net
from .generative import (
    frechet_distance,
    generation_metrics,
    memorisation_ratio,
    mmd_cov_1nna,
    one_nn_accuracy,
    pairwise_distances,
)

# The folder of the `evaluate` module: evaluate.load(str(NEF_GENERATION_METRIC)) works offline.
NEF_GENERATION_METRIC = Path(__file__).resolve().parent / "nef_generation"

__all__ = [
    "NEF_GENERATION_METRIC", "FeatureNetTraining", "ImageFeatureNet", "PointNetFeatureNet", "as_images",
    "as_point_clouds", "chamfer_distance_matrix", "chamfer_nearest_matrices", "frechet_distance", "generation_metrics", "image_distance_matrix",
    "load_feature_net", "memorisation_ratio", "mmd_cov_1nna", "normalize_point_clouds", "one_nn_accuracy",
    "pairwise_distances", "train_feature_net",
]
