"""Render fields: images on their pixel grid, occupancy fields to meshes (marching cubes) and point clouds.

Axis legend: ``b`` fields, ``n`` coordinates, ``r`` grid resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .siren import evaluate_in_chunks
from .spec import SirenSpec


def render_images(
    spec: SirenSpec,
    weights: torch.Tensor,
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Fields -> images in ``[0, 1]``, ``(b, H, W, C)`` float32, un-normalised with the data set's mean/std.

    Values outside ``[0, 1]`` are clipped: a displayed image has no other range (metrics use the same clip for
    real and generated images).
    """
    from ..data.images import image_grid

    height, width, channels = image_shape
    if channels != spec.out_dim:
        raise ValueError(f"image_shape {tuple(image_shape)} has {channels} channels, {spec} outputs {spec.out_dim}")
    outputs = evaluate_in_chunks(spec, weights.float(), image_grid(height, width).to(weights.device))
    mean_t = torch.tensor(mean, device=outputs.device).view(1, 1, -1)
    std_t = torch.tensor(std, device=outputs.device).view(1, 1, -1)
    images = (outputs * std_t + mean_t).clamp_(0.0, 1.0)
    return images.reshape(-1, height, width, channels).cpu().numpy()


def volume_grid(resolution: int, bound: float = 0.5) -> torch.Tensor:
    """Lattice of ``resolution³`` points spanning ``[-bound, bound]³`` (marching-cubes vertices): ``(r³, 3)``."""
    axis = torch.linspace(-bound, bound, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def occupancy_grid(spec: SirenSpec, weights: torch.Tensor, resolution: int = 64, chunk_points: int = 65536) -> torch.Tensor:
    """Occupancy logits of ``b`` fields on a ``resolution³`` lattice over ``[-0.5, 0.5]³``: ``(b, r, r, r)``."""
    if spec.in_dim != 3:
        raise ValueError(f"occupancy rendering needs a 3D field, got {spec}")
    coords = volume_grid(resolution).to(weights.device)
    logits = evaluate_in_chunks(spec, weights.float(), coords, chunk_points=chunk_points)
    return logits[..., 0].reshape(-1, resolution, resolution, resolution)


def extract_mesh(logits: torch.Tensor | np.ndarray, level: float = 0.0, bound: float = 0.5):
    """Marching cubes on one ``(r, r, r)`` logit grid -> `trimesh.Trimesh`, or None when the level set is empty.

    ``level`` 0 is occupancy probability 0.5; HyperDiffusion renders at 1.386 (p = 0.8).
    """
    import trimesh
    from skimage.measure import marching_cubes

    volume = np.asarray(logits.cpu() if isinstance(logits, torch.Tensor) else logits, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic (r, r, r) grid, got shape {volume.shape}")
    if not (volume.min() < level < volume.max()):
        return None
    resolution = volume.shape[0]
    spacing = (2 * bound / (resolution - 1),) * 3
    vertices, faces, normals, _ = marching_cubes(volume, level=level, spacing=spacing)
    vertices = vertices - bound
    return trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=normals, process=False)


def render_meshes(spec: SirenSpec, weights: torch.Tensor, resolution: int = 64, level: float = 0.0) -> list:
    """One mesh per field (None where the field renders empty)."""
    grids = occupancy_grid(spec, weights, resolution)
    return [extract_mesh(grid, level=level) for grid in grids]


def sample_point_cloud(mesh, num_points: int = 2048, seed: int = 0) -> np.ndarray:
    """``num_points`` points sampled uniformly on a mesh's surface, ``(num_points, 3)`` float32 (seeded)."""
    import trimesh

    if mesh is None or len(mesh.faces) == 0:
        raise ValueError("cannot sample points from an empty mesh")
    points, _ = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return np.asarray(points, dtype=np.float32)


def render_point_clouds(spec: SirenSpec, weights: torch.Tensor, num_points: int = 2048, resolution: int = 64,
                        level: float = 0.0, seed: int = 0) -> list:
    """One ``(num_points, 3)`` point cloud per field, None where the field renders empty."""
    return [None if mesh is None else sample_point_cloud(mesh, num_points, seed + i)
            for i, mesh in enumerate(render_meshes(spec, weights, resolution, level))]
