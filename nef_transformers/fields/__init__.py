"""Neural fields: the SIREN architecture and its canonical weight layout, batched evaluation, fitting, rendering."""

from .fit import FitConfig, FitDivergenceError, FitResult, fit_batch, fit_neural_fields, occupancy_iou, psnr_fit_a_nef
from .render import extract_mesh, occupancy_grid, render_images, render_meshes, render_point_clouds, sample_point_cloud
from .siren import evaluate_in_chunks, positional_encoding, siren_forward, siren_init
from .spec import SirenSpec

__all__ = [
    "FitConfig", "FitDivergenceError", "FitResult", "SirenSpec", "evaluate_in_chunks", "extract_mesh",
    "fit_batch", "fit_neural_fields", "occupancy_grid", "occupancy_iou", "positional_encoding", "psnr_fit_a_nef",
    "render_images", "render_meshes", "render_point_clouds", "sample_point_cloud", "siren_forward", "siren_init",
]
