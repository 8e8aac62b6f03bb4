"""Occupancy signal sources for 3D shapes: voxel grids (``.npz``) and folders of meshes (``.obj``, ``.off``, ``.ply``).

A source hands the fitter query points in the cube ``[-0.5, 0.5]³`` and their occupancy (1 inside, 0 outside),
following HyperDiffusion's shape protocol (ANCHORS.md): meshes are centred on their bounding box and scaled to
``max |coord| = 0.475``; training points are half uniform in the cube and half near the surface; occupancy of a
mesh comes from the generalised winding number. Evaluation points (``split="eval"``) are uniform only and drawn
from a different random stream, so they are held out from the training points.

Points are seeded per shape, from ``(seed, split, shape index)``: a shape gets the same points whichever batch
it is asked for in. Mesh occupancy is costly, so call :meth:`MeshFolderSource.points` once per shape with the
whole pool you want (HyperDiffusion: 200k points) and subsample it while fitting; ``cache_dir`` keeps the pool
on disk between runs.

Occupancy of a mesh, two deliberate additions to HyperDiffusion's ``w >= 0.5``, both measured on the raw
ModelNet meshes in ``../shared/data/meshes``:

- faces that repeat the vertex set of an earlier face are dropped. ModelNet's ``chair_0890.off`` stores every
  face twice, once per orientation, so its winding number is 0 everywhere (occupied fraction 0.0000 of 20k
  uniform points; 0.043 after the drop);
- a point is inside when ``|w| >= 0.5``, which equals ``w >= 0.5`` on outward-oriented meshes (all 7 sample
  meshes: identical fractions) and also keeps parts whose faces point inwards (``chair_0893.off``: 0.095 with
  ``w >= 0.5``, 0.112 with ``|w| >= 0.5``; ``chair_0890.off`` after the drop: 0.001 against 0.043).

Costs measured on a 2-core machine shared with other jobs (ranges over repeated runs). Winding numbers of 20,000
uniform query points on ``modelnet40_airplane/airplane_0001.off`` (27,817 vertices, 54,303 faces): libigl's fast
(Barnes-Hut) ``igl.fast_winding_number`` 0.09-0.28 s, the same inside/outside decision as libigl's exact
``winding_number`` on all of 2,000 checked points (which took 4.8 s); the exact chunked torch fallback, used when
libigl is missing, 6-31 s per 1,000 points, i.e. 2-10 minutes per 20k points on such a mesh (fine for small
meshes; install libigl, ``pip install libigl``, for real data). Reading and normalising that ``.off`` file adds
0.4-1.7 s; a whole ``points([0], 20000)`` call took 0.9-2.2 s. Voxel grids: ``points`` for 256 of the 32³ chairs
x 16,384 points took 0.5-1.0 s (train) and 0.16-0.46 s (eval); loading and filling the 889 chairs 0.75-1.1 s.

Axis legend: ``b`` shapes, ``n`` points, ``f`` faces, ``r`` voxels along one axis.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.ndimage
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# HyperDiffusion's normalisation: the mesh's largest |coordinate| after centring its bounding box.
MESH_MAX_ABS_COORD = 0.475
# HyperDiffusion's surface jitter: N(0, 0.01²) on each coordinate of a surface sample.
SURFACE_JITTER_STD = 0.01
# Near-surface voxel samples: a boundary voxel's centre plus U(-1, 1) voxel widths per axis, so they straddle the
# boundary (the boundary voxel is occupied, about half of its jittered neighbourhood is not).
VOXEL_JITTER_WIDTHS = 1.0
MESH_EXTENSIONS = (".obj", ".off", ".ply")
SPLITS = ("train", "eval")
# Bump when the point sampler changes, so cached mesh points computed by an older sampler are not reused.
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------- helpers
def _shape_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one shape: depends on ``(seed, split, index)`` only, never on the batch."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)]))


def _check_points_args(where: str, indices, num_shapes: int, num_points: int, split: str, seed: int) -> np.ndarray:
    indices = np.atleast_1d(np.asarray(indices))
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise ValueError(f"{where}: indices must be a 1-D sequence of integers, got shape {indices.shape} "
                         f"dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_shapes):
        bad = indices[(indices < 0) | (indices >= num_shapes)]
        raise ValueError(f"{where}: shape indices must lie in 0..{num_shapes - 1}, got {bad[:5].tolist()}")
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
        raise ValueError(f"{where}: num_points must be a positive integer, got {num_points!r}")
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    return indices.astype(np.int64)


def _check_labels(where: str, labels, num_shapes: int) -> np.ndarray:
    if labels is None:
        return np.zeros(num_shapes, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.shape != (num_shapes,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be {num_shapes} integers, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    return labels.astype(np.int64)


def fill_shells(voxels: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Fill the enclosed cavities of each ``(b, r, r, r)`` grid, as ``scipy.ndimage.binary_fill_holes`` per grid.

    Empty voxels that cannot reach the grid's border through 6-connected empty voxels become occupied. One
    labelling over a chunk of grids (connectivity never crosses axis ``b``) is ~3x faster than a loop over grids.
    """
    structure = np.zeros((3, 3, 3, 3), dtype=bool)
    structure[1] = scipy.ndimage.generate_binary_structure(3, 1)
    filled = np.empty_like(voxels, dtype=bool)
    for start in range(0, len(voxels), chunk):
        block = voxels[start:start + chunk]
        components, count = scipy.ndimage.label(~block, structure=structure)
        touches_border = np.zeros(count + 1, dtype=bool)
        for axis in (1, 2, 3):
            for end in (0, -1):
                touches_border[np.take(components, end, axis=axis)] = True
        touches_border[0] = False  # label 0 is the occupied voxels themselves
        filled[start:start + chunk] = ~touches_border[components]
    return filled


# ------------------------------------------------------------------------------------------- voxel grids
@dataclass
class VoxelGridSource:
    """Occupancy from voxel grids: voxel ``(i, j, k)`` of an ``r³`` grid is the cell ``i`` along x, ``j`` along y,
    ``k`` along z of the cube ``[-0.5, 0.5]³`` split in ``r`` cells per axis; a point's occupancy is its voxel's.

    Args:
        voxels: ``(b, r, r, r)`` array, bool (or integers / floats that are all 0 or 1).
        labels: ``(b,)`` integer class labels; all 0 when not given.
        name: short name stored with the weight dataset (a file name, ...).
        class_names: optional names of the classes.
        fill: fill each grid's enclosed cavities (``scipy.ndimage.binary_fill_holes``), turning surface shells
            such as ModelNet's voxelisations into solids. Set ``False`` for grids that are solid already.
    """

    voxels: np.ndarray
    labels: np.ndarray | None = None
    name: str = "voxels"
    class_names: list[str] = field(default_factory=list)
    fill: bool = True

    kind = "occupancy"
    eval_split = "centres"  # IoU on every voxel centre (see `voxel_centres`)

    def __post_init__(self):
        voxels = np.asarray(self.voxels)
        where = f"voxel source {self.name!r}"
        if voxels.ndim != 4 or not (voxels.shape[1] == voxels.shape[2] == voxels.shape[3]):
            raise ValueError(f"{where}: voxels must have shape (N, R, R, R) (cubic grids), got {voxels.shape}")
        if len(voxels) == 0 or voxels.shape[1] == 0:
            raise ValueError(f"{where} is empty: no voxel grids to fit (shape {voxels.shape})")
        if voxels.dtype != bool:
            if not (np.issubdtype(voxels.dtype, np.integer) or np.issubdtype(voxels.dtype, np.floating)):
                raise ValueError(f"{where}: voxels must be bool or 0/1 numbers, got dtype {voxels.dtype}")
            not_binary = (voxels != 0) & (voxels != 1)
            if not_binary.any():
                first = tuple(int(i) for i in np.argwhere(not_binary)[0])
                raise ValueError(f"{where}: voxels must be bool or only 0/1, got value {voxels[first]!r} at index "
                                 f"{first} (dtype {voxels.dtype}); threshold the grids first")
            voxels = voxels == 1
        if self.fill:
            before = voxels.mean()
            voxels = fill_shells(voxels)
            logger.info("%s: filled the inside of %d grids, occupied fraction %.4f -> %.4f", where, len(voxels),
                        before, voxels.mean())
        empty = np.flatnonzero(~voxels.reshape(len(voxels), -1).any(1))
        if empty.size:
            raise ValueError(f"{where}: {empty.size} grids have no occupied voxel (indices {empty[:10].tolist()}); "
                             f"remove them before fitting")
        self.voxels = np.ascontiguousarray(voxels)
        self.labels = _check_labels(where, self.labels, len(voxels))
        self.class_names = [str(c) for c in self.class_names]
        self._boundary_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.voxels)

    @property
    def resolution(self) -> int:
        return self.voxels.shape[1]

    @property
    def in_dim(self) -> int:
        return 3

    @property
    def out_dim(self) -> int:
        return 1

    def _boundary_centres(self, index: int) -> np.ndarray:
        """Centres ``(m, 3)`` of the occupied voxels of one grid that have an empty 6-neighbour (outside is empty)."""
        if index not in self._boundary_cache:
            grid = np.pad(self.voxels[index], 1)
            interior = grid[1:-1, 1:-1, 1:-1].copy()
            for axis in range(3):
                for shift in (-1, 1):
                    interior &= np.roll(grid, shift, axis=axis)[1:-1, 1:-1, 1:-1]
            cells = np.argwhere(self.voxels[index] & ~interior)
            self._boundary_cache[index] = (cells + 0.5) / self.resolution - 0.5
        return self._boundary_cache[index]

    def points(self, indices: Sequence[int] | np.ndarray, num_points: int, split: str = "train",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Query points and their occupancy for the given shapes.

        ``split="train"``: ``num_points // 2`` uniform points in the cube and the rest near the surface (boundary
        voxel centres jittered by up to one voxel per axis, clipped to the cube), shuffled. ``split="eval"``:
        uniform points from another random stream. Deterministic in ``(shape index, num_points, split, seed)``.

        Returns:
            coords ``(b, n, 3)`` float32 in ``[-0.5, 0.5]``, occupancy ``(b, n, 1)`` float32 in {0, 1}.
        """
        if split == "centres":
            return self.voxel_centres(indices)
        indices = _check_points_args(f"voxel source {self.name!r}", indices, len(self), num_points, split, seed)
        r = self.resolution
        num_uniform = num_points if split == "eval" else num_points // 2
        coords = np.empty((len(indices), num_points, 3), dtype=np.float32)
        occupancy = np.empty((len(indices), num_points), dtype=np.float32)
        for row, index in enumerate(indices):
            rng = _shape_rng(seed, split, index)
            points = coords[row]  # (n, 3), a view
            points[:num_uniform] = rng.random((num_uniform, 3)) - 0.5
            if num_uniform < num_points:
                centres = self._boundary_centres(index)
                near = np.take(centres, rng.integers(len(centres), size=num_points - num_uniform), axis=0)
                near += rng.uniform(-VOXEL_JITTER_WIDTHS / r, VOXEL_JITTER_WIDTHS / r, size=near.shape)
                points[num_uniform:] = np.clip(near, -0.5, 0.5)
                points[:] = np.take(points, rng.permutation(num_points), axis=0)  # np.take: 3x faster than []
            # the voxel containing each returned (float32) point; x = 0.5 belongs to the last voxel
            cells = np.minimum((points + np.float64(0.5)) * r, r - 1).astype(np.intp)  # (n, 3)
            occupancy[row] = self.voxels[index][cells[:, 0], cells[:, 1], cells[:, 2]]
        return torch.from_numpy(coords), torch.from_numpy(occupancy[..., None])

    def voxel_centres(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Every voxel centre and its occupancy: ``(b, R³, 3)``, ``(b, R³, 1)``.

        The held-out points for a voxel source's IoU (``eval_split``): the ground truth is defined per voxel,
        and random points inside boundary voxels would score a smooth field against the blocky voxel faces.
        """
        indices = _check_points_args(f"voxel source {self.name!r}", indices, len(self), 1, "eval", 0)
        r = self.resolution
        axis = (np.arange(r, dtype=np.float32) + 0.5) / r - 0.5
        centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(1, -1, 3)
        coords = torch.from_numpy(np.repeat(centres, len(indices), axis=0))
        occupancy = torch.from_numpy(self.voxels[np.asarray(indices)].reshape(len(indices), -1, 1).astype(np.float32))
        return coords, occupancy

    def describe(self) -> dict:
        """What a weight dataset stores about its source."""
        return {"kind": self.kind, "name": self.name, "class_names": list(self.class_names),
                "resolution": int(self.resolution)}

    @classmethod
    def from_npz(cls, path: str | Path, key: str = "voxels", num_shapes: int | None = None,
                 fill: bool = True) -> "VoxelGridSource":
        """Grids from an ``.npz`` holding ``key`` ``(N, R, R, R)`` and optionally ``labels`` and ``classes``.

        ``num_shapes`` keeps the first grids only (before filling, to save time).
        """
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as error:
            raise ValueError(f"cannot read voxel file {path}: {error}") from error
        if key not in data.files:
            raise ValueError(f"{path} has no {key!r} array (found {data.files}); expected voxels (N, R, R, R) bool")
        if num_shapes is not None and (isinstance(num_shapes, bool) or not isinstance(num_shapes, (int, np.integer))
                                       or num_shapes < 1):
            raise ValueError(f"num_shapes must be a positive integer or None, got {num_shapes!r}")
        voxels = data[key][:num_shapes]
        labels = data["labels"][:num_shapes] if "labels" in data.files else None
        class_names = [str(c) for c in data["classes"]] if "classes" in data.files else []
        return cls(voxels=voxels, labels=labels, name=path.stem, class_names=class_names, fill=fill)


# ------------------------------------------------------------------------------------------- meshes
def winding_numbers_torch(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray,
                          pairs_per_chunk: int = 1 << 20) -> np.ndarray:
    """Exact generalised winding numbers (Jacobson et al. 2013), ``(n,)`` float64, in chunks of query points.

    Each triangle ``(a, b, c)`` seen from a query point subtends the solid angle
    ``2 atan2(a · (b × c), |a||b||c| + (a · b)|c| + (b · c)|a| + (c · a)|b|)`` (Van Oosterom & Strackee 1983,
    corners relative to the point); the winding number is their sum over ``4π``. Cost: ``n × f`` pairs.
    """
    corners = torch.from_numpy(np.asarray(vertices, dtype=np.float64)[np.asarray(faces)])  # (f, 3 corners, 3 xyz)
    corners = corners.permute(1, 2, 0).contiguous()  # (3 corners, 3 xyz, f): contiguous rows per coordinate
    queries = torch.from_numpy(np.asarray(queries, dtype=np.float64))
    chunk = max(1, pairs_per_chunk // max(1, corners.shape[-1]))
    out = []
    with torch.inference_mode():
        for block in queries.split(chunk):
            rel = corners[None] - block[:, None, :, None]  # (n, 3 corners, 3 xyz, f)
            (ax, ay, az), (bx, by, bz), (cx, cy, cz) = (corner.unbind(1) for corner in rel.unbind(1))
            la = torch.sqrt(ax * ax + ay * ay + az * az)
            lb = torch.sqrt(bx * bx + by * by + bz * bz)
            lc = torch.sqrt(cx * cx + cy * cy + cz * cz)
            det = ax * (by * cz - bz * cy) + ay * (bz * cx - bx * cz) + az * (bx * cy - by * cx)
            dot_ab = ax * bx + ay * by + az * bz
            dot_bc = bx * cx + by * cy + bz * cz
            dot_ca = cx * ax + cy * ay + cz * az
            denominator = la * lb * lc + dot_ab * lc + dot_bc * la + dot_ca * lb
            out.append(torch.atan2(det, denominator).sum(-1) / (2 * torch.pi))  # (n,)
    return torch.cat(out).numpy() if out else np.zeros(0)


def _igl_fast_winding():
    """libigl's fast winding number for triangle meshes, under its old or new name, or None without libigl."""
    try:
        import igl
    except ImportError:
        return None
    return getattr(igl, "fast_winding_number_for_meshes", None) or getattr(igl, "fast_winding_number", None)


def winding_numbers(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Generalised winding numbers ``(n,)`` of ``queries`` ``(n, 3)`` for the mesh ``(vertices, faces)``.

    ``backend``: ``"igl"`` (libigl's fast winding number), ``"torch"`` (exact, slow on big meshes, see the module
    docstring) or ``"auto"`` (libigl when it is installed and works, else torch).
    """
    if backend not in ("auto", "igl", "torch"):
        raise ValueError(f"winding-number backend must be 'auto', 'igl' or 'torch', got {backend!r}")
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float64)
    if backend != "torch":
        fast = _igl_fast_winding()
        if fast is None and backend == "igl":
            raise ValueError("winding-number backend 'igl' needs libigl: pip install libigl")
        if fast is not None:
            try:
                return np.asarray(fast(vertices, faces, queries), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as error:
                if backend == "igl":
                    raise
                logger.warning("libigl's fast winding number failed (%s); using the exact torch winding number",
                               error)
    return winding_numbers_torch(vertices, faces, queries)


def load_normalized_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A mesh file's vertices ``(v, 3)`` float64 and faces ``(f, 3)`` int64, normalised as HyperDiffusion.

    The bounding box is centred at the origin and the mesh scaled so that its largest ``|coord|`` is 0.475.
    Faces repeating the vertex set of an earlier face (double-sided copies) are dropped, see the module docstring.
    """
    import trimesh

    path = Path(path)
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as error:
        raise ValueError(f"cannot read mesh file {path}: {type(error).__name__}: {error}") from error
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
    if len(faces) == 0 or len(vertices) == 0:
        raise ValueError(f"mesh file {path} has no triangles ({len(vertices)} vertices, {len(faces)} faces)")
    if not np.isfinite(vertices).all():
        raise ValueError(f"mesh file {path} has NaN or infinite vertex coordinates")
    _, first = np.unique(np.sort(faces, axis=1), axis=0, return_index=True)
    faces = faces[np.sort(first)]
    used = vertices[np.unique(faces)]
    low, high = used.min(0), used.max(0)
    vertices = vertices - (low + high) / 2
    extent = np.abs(vertices[np.unique(faces)]).max()
    if extent == 0:
        raise ValueError(f"mesh file {path} is degenerate: all its faces collapse to one point")
    vertices = vertices * (MESH_MAX_ABS_COORD / extent)
    if _face_areas(vertices, faces).sum() == 0:
        raise ValueError(f"mesh file {path} is degenerate: all its faces have zero area")
    return vertices, faces


def _face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    triangles = vertices[faces]  # (f, 3 corners, 3 xyz)
    return 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniform on the mesh surface (faces picked by area, uniform barycentric coordinates)."""
    triangles = vertices[faces]  # (f, 3 corners, 3 xyz)
    areas = _face_areas(vertices, faces)
    picked = rng.choice(len(faces), size=count, p=areas / areas.sum())
    u, v = rng.random((2, count, 1))
    flip = (u + v) > 1  # reflect points of the parallelogram's far half back into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    a, b, c = triangles[picked, 0], triangles[picked, 1], triangles[picked, 2]
    return a + u * (b - a) + v * (c - a)


@dataclass
class MeshFolderSource:
    """Occupancy from a folder of mesh files (``.obj``, ``.off``, ``.ply``, searched recursively, sorted).

    Every mesh file is one shape (ShapeNet's ``<synset>/<model>/models/model_normalized.obj`` included). A shape's
    label is the index of its first-level subfolder (``class_names`` are those folder names, sorted), or 0 for
    all when the files lie directly in ``root``.

    Args:
        root: the folder.
        cache_dir: optional folder for the computed points and occupancy of each mesh (one ``.npz`` per mesh
            and request, keyed by the file's content), so refitting does not recompute winding numbers.
        name: short name stored with the weight dataset; ``root``'s name when not given.
        num_shapes: keep the first files only.
        winding_backend: ``"auto"``, ``"igl"`` or ``"torch"``, see :func:`winding_numbers`.
    """

    root: str | Path
    cache_dir: str | Path | None = None
    name: str | None = None
    num_shapes: int | None = None
    winding_backend: str = "auto"
    files: list[Path] = field(init=False)
    labels: np.ndarray = field(init=False)
    class_names: list[str] = field(init=False)

    kind = "occupancy"
    eval_split = "eval"  # IoU on uniform held-out points (Occupancy Networks)

    def __post_init__(self):
        self.root = Path(self.root)
        self.name = self.name or self.root.name
        where = f"mesh source {self.name!r}"
        if not self.root.is_dir():
            raise ValueError(f"{where}: {self.root} is not a folder")
        if self.winding_backend not in ("auto", "igl", "torch"):
            raise ValueError(f"{where}: winding_backend must be 'auto', 'igl' or 'torch', got {self.winding_backend!r}")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in MESH_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"{where}: no mesh files ({', '.join(MESH_EXTENSIONS)}) found under {self.root}")
        if self.num_shapes is not None:
            if isinstance(self.num_shapes, bool) or not isinstance(self.num_shapes, (int, np.integer)) \
                    or self.num_shapes < 1:
                raise ValueError(f"{where}: num_shapes must be a positive integer or None, got {self.num_shapes!r}")
            files = files[:self.num_shapes]
        relative = [p.relative_to(self.root) for p in files]
        flat = [r for r in relative if len(r.parts) == 1]
        nested = [r for r in relative if len(r.parts) > 1]
        if flat and nested:
            raise ValueError(f"{where}: {self.root} mixes mesh files directly in it (e.g. {flat[0]}) with files in "
                             f"class subfolders (e.g. {nested[0]}); put all files in subfolders or none")
        self.class_names = sorted({r.parts[0] for r in nested})
        self.labels = np.array([self.class_names.index(r.parts[0]) if nested else 0 for r in relative], dtype=np.int64)
        self.files = files
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._digests: dict[int, str] = {}
        logger.info("%s: %d mesh files in %d classes under %s", where, len(files), max(1, len(self.class_names)),
                    self.root)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def in_dim(self) -> int:
        return 3

    @property
    def out_dim(self) -> int:
        return 1

    def _cache_path(self, index: int, num_points: int, split: str, seed: int) -> Path:
        if index not in self._digests:
            self._digests[index] = hashlib.sha1(self.files[index].read_bytes()).hexdigest()
        key = f"{self._digests[index]}|{num_points}|{split}|{seed}|v{CACHE_VERSION}"
        slug = "_".join(self.files[index].relative_to(self.root).with_suffix("").parts)[-80:]
        return self.cache_dir / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"

    def _compute(self, index: int, num_points: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        vertices, faces = load_normalized_mesh(self.files[index])
        rng = _shape_rng(seed, split, index)
        num_uniform = num_points if split == "eval" else num_points // 2
        coords = rng.random((num_uniform, 3)) - 0.5
        if num_uniform < num_points:
            surface = sample_surface(vertices, faces, num_points - num_uniform, rng)
            near = np.clip(surface + rng.normal(0.0, SURFACE_JITTER_STD, surface.shape), -0.5, 0.5)
            coords = np.concatenate([coords, near])[rng.permutation(num_points)]
        coords = coords.astype(np.float32)  # occupancy of the float32 points actually returned
        winding = winding_numbers(vertices, faces, coords, backend=self.winding_backend)
        return coords, np.abs(winding) >= 0.5

    def _points_of(self, index: int, num_points: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache_dir is None:
            return self._compute(index, num_points, split, seed)
        path = self._cache_path(index, num_points, split, seed)
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as data:
                    coords, occupancy = data["coords"], data["occupancy"]
                if coords.shape == (num_points, 3) and occupancy.shape == (num_points,):
                    return coords, occupancy
                logger.warning("cached points %s have the wrong shape; recomputing", path)
            except Exception as error:
                logger.warning("cannot read cached points %s (%s); recomputing", path, error)
        coords, occupancy = self._compute(index, num_points, split, seed)
        handle, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, coords=coords, occupancy=occupancy, mesh_file=str(self.files[index]))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return coords, occupancy

    def points(self, indices: Sequence[int] | np.ndarray, num_points: int, split: str = "train",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Query points and their winding-number occupancy for the given meshes.

        ``split="train"``: ``num_points // 2`` uniform points in the cube and the rest surface samples jittered by
        N(0, 0.01²) (clipped to the cube), shuffled. ``split="eval"``: uniform points from another random stream.
        Deterministic in ``(shape index, num_points, split, seed)``.

        Returns:
            coords ``(b, n, 3)`` float32 in ``[-0.5, 0.5]``, occupancy ``(b, n, 1)`` float32 in {0, 1}.
        """
        indices = _check_points_args(f"mesh source {self.name!r}", indices, len(self), num_points, split, seed)
        coords = np.empty((len(indices), num_points, 3), dtype=np.float32)
        occupancy = np.empty((len(indices), num_points), dtype=np.float32)
        for row, index in enumerate(tqdm(indices, desc=f"{self.name}: mesh occupancy", leave=False, disable=None)):
            coords[row], occupancy[row] = self._points_of(int(index), num_points, split, seed)
        return torch.from_numpy(coords), torch.from_numpy(occupancy[..., None])

    def describe(self) -> dict:
        """What a weight dataset stores about its source."""
        return {"kind": self.kind, "name": self.name, "class_names": list(self.class_names), "root": str(self.root),
                "max_abs_coord": MESH_MAX_ABS_COORD}


def load_shape_source(path: str | Path, num_shapes: int | None = None, *,
                      cache_dir: str | Path | None = None) -> VoxelGridSource | MeshFolderSource:
    """A shape source from a path: an ``.npz`` of voxel grids or a folder of mesh files.

    ``cache_dir`` (mesh folders only) keeps computed mesh points between runs.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"shape source {path} does not exist; give an .npz of voxel grids or a folder of meshes")
    if path.is_dir():
        return MeshFolderSource(root=path, cache_dir=cache_dir, num_shapes=num_shapes)
    if path.suffix.lower() == ".npz":
        return VoxelGridSource.from_npz(path, num_shapes=num_shapes)
    raise ValueError(f"shape source {path} is neither an .npz of voxel grids nor a folder of mesh files "
                     f"({', '.join(MESH_EXTENSIONS)})")


__all__ = [
    "VoxelGridSource",
    "MeshFolderSource",
    "load_shape_source",
    "load_normalized_mesh",
    "winding_numbers",
    "winding_numbers_torch",
    "sample_surface",
    "fill_shells",
]
