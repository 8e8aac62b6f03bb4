"""Pairwise distances between sets of generated and real items: squared-L2 Chamfer between point clouds and
mean squared pixel difference between images.

HyperDiffusion's protocol (``evaluation_metrics_3d.py``, after PointFlow; ANCHORS.md): each point cloud is
normalised on its own, ``(pc - mean) / std(all 3n coordinates)`` (torch's default, unbiased ``std``, of the
uncentred coordinates as their code does; see `normalize_point_clouds`), and the
Chamfer distance of two clouds ``x`` ``(n, 3)`` and ``y`` ``(m, 3)`` is on **squared** distances::

    CD(x, y) = mean_i min_j |x_i - y_j|² + mean_j min_i |x_i - y_j|²

Three exact ways to find the nearest points (`chamfer_distance_matrix(method=...)`; ``"auto"`` picks by
device):

- ``"grid"`` (CPU default when numba imports): one uniform grid per cloud (a counting sort of its points into
  cubic cells over its bounding box, about 2.5 points per cell), searched shell by shell around each query's
  cell until no unvisited cell can hold a nearer point (`_grid_pairs_py`), in a numba kernel that runs without
  the GIL. Exact like the k-d trees (direct float64 differences, the same minima; sums agree to round-off).
  Each direction's queries run in GRID_PASSES interleaved passes, with a lower bound of the distance after each
  (the exact terms so far plus a Lipschitz bound of the others from their nearest first-pass point): that lets
  `chamfer_nearest_matrices` and ``nearest_only=True`` drop the pairs that cannot be a minimum (`_grid_minima`).
  Measured on the shared 2-core machine against ``"kdtree"`` in one run, 2,048-point clouds: one thread
  ~1.3 ms against ~3.4 ms per pair on Gaussian blobs, ~2.5 ms against ~6.5 ms on surface samples (the search
  reaches farther when two shapes differ); 2 threads (benchmarks/metric_speed.py, 50 x 50 pairs) 0.74 against
  1.91 ms per pair (2.6x) on Gaussian blobs, 3.8 against 10.2 ms (2.7x) on surfaces, on a loaded machine.
  Compiling takes ~6 s once (again after each edit of this file); the machine code is cached on disk.
- ``"kdtree"`` (CPU default without numba): one `scipy.spatial.cKDTree` per cloud, queried with the points of
  every cloud of the other set, O(n log m) per pair instead of O(n m). The distances are direct differences in
  float64, so identical points are exactly 0 apart. Measured on the shared 2-core machine (benchmarks/RESULTS.md,
  "Metrics"): ~0.9 µs of CPU per nearest-point query, 2.1x faster than the dense tiles below on 2,048-point
  clouds (timed against each other in one run).
- ``"dense"`` (GPU default): the expansion ``|x|² + |y|² - 2 x·y`` (one batched matrix product per tile, both
  directions' minima from one tile). Its rounding error is about ``eps · (|x|² + |y|²)``, so a nearest-point
  distance below ``16 · eps · (|x|² + |y|²)`` is reported as exactly 0 and negative round-off is clamped to 0.
  Memory stays bounded whatever the set sizes: pairs of clouds are processed in blocks of ``chunk_elements``
  point-to-point distances (CPU default ``2**18`` per worker, ~1 MB of float32 that stays in cache: the fastest
  tile measured on the 2-core machines, 11-12 ms per pair of 2,048-point clouds on one loaded thread against
  45 ms for whole-pair matrices; GPU default ``2**27``).

Every way, identical items get distance 0 and duplicated items tie exactly (what the 1-NNA tie rule in
`generative` relies on). On the CPU, ``num_workers`` threads take whole units of work each (a block of pairs, or a
k-d tree and its queries), with torch single-threaded meanwhile (see `chamfer_distance_matrix`).

Axis legend: ``a``, ``b`` items of the two sets, ``n``, ``m`` points of one cloud, ``p`` pairs in a block,
``r`` rows (points of the first cloud) in a tile, ``q`` query clouds of one k-d tree call.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# A nearest distance below SNAP_ULPS · eps(dtype) · (|x|² + |y|²) is indistinguishable from 0 (see the docstring).
SNAP_ULPS = 16.0
CPU_CHUNK_ELEMENTS_PER_WORKER = 2 ** 18
GPU_CHUNK_ELEMENTS = 2 ** 27
# Points per k-d tree query call: bounds the (distances, indices) it returns to 4 MB; the call overhead is negligible.
KDTREE_QUERY_POINTS = 2 ** 18
# Grid method: at most n / GRID_POINTS_PER_CELL cells per grid (2.5: fastest of 1.5 / 2.5 / 4 measured on Gaussian
# and surface clouds of 2,048 points together), and pairs per task of a worker.
GRID_POINTS_PER_CELL = 2.5
GRID_SPAN_PAIRS = 256
# Each direction's queries run in GRID_PASSES interleaved passes, with a lower bound after each (16: 4.4x over the full
# matrices on 100 + 100 real chairs, against 3.8x for 8 and 3.6x for 32); pairs per block of the nearest-only search
# (`_grid_minima`), after which the limits tighten.
GRID_PASSES = 16
GRID_MINIMA_BLOCK = 2 ** 11
CHAMFER_METHODS = ("auto", "grid", "kdtree", "dense")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- helpers
def _resolve_device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _default_chunk_elements(device: torch.device) -> int:
    return CPU_CHUNK_ELEMENTS_PER_WORKER if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _check_chunk_elements(chunk_elements) -> None:
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, (int, np.integer)) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")


def _first_nonfinite(values: torch.Tensor) -> int | None:
    """Index along axis 0 of the first item holding NaN or inf, None when all are finite."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
    return int(bad.nonzero()[0, 0]) if bad.any() else None


def _to_tensor(item, where: str) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item.detach().cpu()
    array = np.asarray(item)
    if array.dtype == object:
        raise ValueError(f"{where} is not a numeric array (got an object array; ragged nested lists?)")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == bool):
        raise ValueError(f"{where} must hold numbers, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _stack_items(items, name: str, what: str) -> torch.Tensor:
    """A tensor or array ``(b, ...)`` as is, or a list of per-item arrays stacked after checking their shapes."""
    if isinstance(items, (torch.Tensor, np.ndarray)) and not (isinstance(items, np.ndarray) and items.dtype == object):
        tensor = _to_tensor(items, name)
        if tensor.ndim == 0 or len(tensor) == 0:
            raise ValueError(f"{name} is empty: no {what} to compare (shape {tuple(tensor.shape)})")
        return tensor
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be an array, a tensor or a list of {what}, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError(f"{name} is empty: no {what} to compare")
    tensors = []
    for index, item in enumerate(items):
        if item is None:
            raise ValueError(f"{name}[{index}] is None (an empty render?): drop empty items and report their count "
                             f"before computing distances")
        tensors.append(_to_tensor(item, f"{name}[{index}]"))
        if tensors[-1].shape != tensors[0].shape:
            raise ValueError(f"{name} is ragged: {name}[{index}] has shape {tuple(tensors[-1].shape)} but {name}[0] "
                             f"has {tuple(tensors[0].shape)}; all {what} of a set must have the same shape")
    return torch.stack(tensors)


# ------------------------------------------------------------------------------------------- point clouds
def as_point_clouds(clouds, name: str = "point clouds") -> torch.Tensor:
    """Check a set of point clouds and return it as a ``(b, n, 3)`` float tensor on the CPU.

    Accepts a ``(b, n, 3)`` array or tensor, or a list of ``(n, 3)`` arrays that all have the same ``n``
    (the Chamfer distance of HyperDiffusion's protocol compares clouds of equal size: resample, e.g. with
    `nef_transformers.fields.sample_point_cloud(mesh, 2048)`). Raises `ValueError` naming the first offending
    item for empty sets, ragged lists, ``None`` items (empty renders), wrong shapes and NaN or inf.
    """
    if isinstance(clouds, (list, tuple)):
        first = None  # (index, number of points) of the first cloud
        for index, item in enumerate(clouds):
            if item is None:
                break  # reported by _stack_items
            shape = tuple(item.shape) if hasattr(item, "shape") else np.shape(item)
            if len(shape) != 2 or shape[-1] != 3:
                raise ValueError(f"{name}[{index}] must be an (n, 3) array of points, got shape {shape}")
            if first is None:
                first = (index, shape[0])
            elif shape[0] != first[1]:
                raise ValueError(f"{name} is ragged: {name}[{index}] has {shape[0]} points but {name}[{first[0]}] has "
                                 f"{first[1]}; every cloud of a set must have the same number of points (resample "
                                 f"them, e.g. sample_point_cloud(mesh, 2048))")
    tensor = _stack_items(clouds, name, "point clouds")
    if tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (b, n, 3), got {tuple(tensor.shape)}")
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has clouds of 0 points (shape {tuple(tensor.shape)})")
    if not tensor.is_floating_point():
        tensor = tensor.double()
    bad = _first_nonfinite(tensor)
    if bad is not None:
        raise ValueError(f"{name}[{bad}] contains NaN or inf")
    return tensor


def normalize_point_clouds(clouds, name: str = "point clouds", centered_std: bool = False) -> torch.Tensor:
    """HyperDiffusion's per-cloud normalisation ``(pc - mean) / std``: ``(b, n, 3)`` -> ``(b, n, 3)``, input dtype.

    As ``hyperdiffusion.py`` (``shift = pc.mean(dim=0)``, ``scale = pc.flatten().std()``) the std runs over all
    ``3n`` coordinates of the cloud **before** centring, unbiased. That makes the normalised cloud invariant to
    scaling and to translations along ``(1, 1, 1)``, but not to other translations: the spread of the three
    axis means enters the std (about 1 % of the scale for bounding-box-centred shapes, whose point means sit
    near 0). ``centered_std=True`` takes the std after centring instead: invariant to every translation.

    A cloud whose points all coincide (std 0) cannot be normalised and raises `ValueError` naming it.
    """
    clouds = as_point_clouds(clouds, name)
    if clouds.shape[1] * 3 < 2:
        raise ValueError(f"{name}: normalisation needs at least 2 coordinates per cloud, got {clouds.shape[1]} point")
    centred = clouds - clouds.mean(dim=1, keepdim=True)  # (b, n, 3)
    scale = (centred if centered_std else clouds).flatten(1).std(dim=1)  # (b,)
    flat = np.flatnonzero((scale <= 0).numpy())
    if flat.size:
        raise ValueError(f"{name}[{int(flat[0])}] has all its points at one location (std 0): cannot normalise it "
                         f"({flat.size} such clouds)")
    return centred / scale.view(-1, 1, 1)


def _augment(points: torch.Tensor, side: str) -> torch.Tensor:
    """Rows ``[x, |x|², 1]`` (left) or ``[-2y, 1, |y|²]`` (right): their dot product is ``|x - y|²``."""
    squared = (points * points).sum(-1, keepdim=True)
    ones = torch.ones_like(squared)
    if side == "left":
        return torch.cat([points, squared, ones], dim=-1)  # (b, n, 5)
    return torch.cat([-2.0 * points, ones, squared], dim=-1)  # (b, m, 5)


def _chamfer_block(left: torch.Tensor, right_t: torch.Tensor, left_sq: torch.Tensor, right_sq: torch.Tensor,
                   rows: int) -> torch.Tensor:
    """Chamfer distances of ``p`` cloud pairs: ``left`` ``(p, n, 5)``, ``right_t`` ``(p, 5, m)``, squared norms
    ``(p, n)`` and ``(p, m)`` -> ``(p,)`` float64."""
    num_pairs, n, _ = left.shape
    m = right_t.shape[-1]
    eps = torch.finfo(left.dtype).eps * SNAP_ULPS
    right_max = right_sq.amax(1, keepdim=True)  # (p, 1)
    left_max = left_sq.amax(1, keepdim=True)
    col_min = torch.full((num_pairs, m), float("inf"), dtype=left.dtype, device=left.device)  # (p, m)
    row_sum = torch.zeros(num_pairs, dtype=torch.float64, device=left.device)
    for start in range(0, n, rows):
        tile = torch.bmm(left[:, start:start + rows], right_t)  # (p, r, m) squared distances
        row_min = tile.amin(2)  # (p, r)
        row_min = torch.where(row_min < eps * (left_sq[:, start:start + rows] + right_max), 0.0, row_min)
        row_sum += row_min.sum(1, dtype=torch.float64)
        torch.minimum(col_min, tile.amin(1), out=col_min)
    col_min = torch.where(col_min < eps * (right_sq + left_max), 0.0, col_min)
    return row_sum / n + col_min.sum(1, dtype=torch.float64) / m


def _run_in_threads(function, tasks: list, collect, *, num_workers: int, cpu: bool, progress_bar: dict,
                    size=len) -> None:
    """``collect(task, function(task))`` for every task, in order, with ``num_workers`` threads each taking whole
    tasks (torch and scipy release the GIL); torch runs single-threaded on the CPU meanwhile (restored
    afterwards). The progress bar advances by ``size`` (default ``len``) of each result."""
    pool = None
    previous_threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)  # each worker (or the caller) runs its ops on one core, with no barrier
    try:
        if num_workers > 1 and len(tasks) > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=num_workers)
            results = pool.map(function, tasks)
        else:
            results = map(function, tasks)
        with tqdm(leave=False, **progress_bar) as bar:
            for task, result in zip(tasks, results):
                collect(task, result)
                bar.update(size(result))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        torch.set_num_threads(previous_threads)


def _chamfer_dense(a: torch.Tensor, b: torch.Tensor | None, *, chunk_elements: int, num_workers: int,
                   disable: bool | None) -> torch.Tensor:
    """The ``"dense"`` method: ``(a, n, 3)``, ``(b, m, 3)`` (``None``: within ``a``) on the compute device ->
    ``(a, b)`` float64 on that device."""
    symmetric = b is None
    b = a if symmetric else b
    device, n, m = a.device, a.shape[1], b.shape[1]
    left, right_t = _augment(a, "left"), _augment(b, "right").transpose(1, 2).contiguous()  # (a, n, 5), (b, 5, m)
    left_sq, right_sq = left[..., 3], right_t[:, 4]  # |x|² (a, n), |y|² (b, m)
    if symmetric:
        first, second = torch.triu_indices(len(a), len(a), offset=1, device=device)
    else:
        first = torch.arange(len(a), device=device).repeat_interleave(len(b))
        second = torch.arange(len(b), device=device).repeat(len(a))
    pairs_per_block = max(1, chunk_elements // (n * m))
    rows = min(n, max(1, chunk_elements // (pairs_per_block * m)))

    def run(span: tuple[int, int]) -> torch.Tensor:
        """Chamfer distances of the pairs ``span[0] .. span[1] - 1``, block by block."""
        values = []
        for start in range(span[0], span[1], pairs_per_block):
            stop = min(start + pairs_per_block, span[1])
            i, j = first[start:stop], second[start:stop]
            values.append(_chamfer_block(left[i], right_t[j], left_sq[i], right_sq[j], rows))
        return torch.cat(values)

    num_pairs = len(first)
    # Spans of whole blocks: ~16 per worker balances the load; at most 256 pairs keeps the progress bar moving.
    span_pairs = min(256, -(-num_pairs // (16 * num_workers))) // pairs_per_block * pairs_per_block
    span_pairs = max(pairs_per_block, span_pairs)
    spans = [(start, min(start + span_pairs, num_pairs)) for start in range(0, num_pairs, span_pairs)]
    out = torch.zeros(num_pairs, dtype=torch.float64, device=device)

    def collect(span: tuple[int, int], values: torch.Tensor) -> None:
        out[span[0]:span[1]] = values

    _run_in_threads(run, spans, collect, num_workers=num_workers, cpu=device.type == "cpu",
                    progress_bar=dict(total=num_pairs, desc="Chamfer distances", unit="pair", disable=disable))
    matrix = torch.zeros(len(a) * len(b), dtype=torch.float64, device=device)
    matrix[first * len(b) + second] = out
    matrix = matrix.view(len(a), len(b))
    return matrix + matrix.T if symmetric else matrix


def _chamfer_kdtree(a: np.ndarray, b: np.ndarray | None, *, num_workers: int, disable: bool | None) -> torch.Tensor:
    """The ``"kdtree"`` method: float64 ``(a, n, 3)``, ``(b, m, 3)`` (``None``: within ``a``) -> ``(a, b)`` float64.

    One task per cloud: build its k-d tree and query it with the points of every cloud of the other set (of the
    same set, itself excepted, when symmetric), ``KDTREE_QUERY_POINTS`` points per call. A task yields one
    direction of the Chamfer distance for a whole column of pairs: ``mean_i min_j |x_i - y_j|²`` for every
    query cloud ``x`` and the tree's cloud ``y``.
    """
    from scipy.spatial import cKDTree

    symmetric = b is None
    sets = {"a": a, "b": a if symmetric else b}
    other = {"a": "a" if symmetric else "b", "b": "a"}  # the set whose clouds query a tree of set `side`

    def run(task: tuple[str, int]) -> np.ndarray:
        """``(q,)`` mean squared nearest-point distances of each cloud of the other set to cloud ``task``."""
        side, index = task
        tree = cKDTree(sets[side][index])
        queries = sets[other[side]]  # (q, n, 3)
        count, n = queries.shape[:2]
        means = np.zeros(count)
        per_call = max(1, KDTREE_QUERY_POINTS // n)
        ranges = [(0, index), (index + 1, count)] if symmetric else [(0, count)]
        for low, high in ranges:
            for start in range(low, high, per_call):
                stop = min(start + per_call, high)
                distances, _ = tree.query(queries[start:stop].reshape(-1, 3))  # (q n,) Euclidean
                means[start:stop] = np.square(distances).reshape(stop - start, n).mean(1)
        return means

    # to_tree[side][k] holds task (side, k)'s means as a column: to_tree["b"][i, j] = mean over a_i of the
    # squared distances to the nearest points of b_j, to_tree["a"][j, i] = the same from b_j to a_i.
    sides = ("a",) if symmetric else ("a", "b")
    to_tree = {side: np.zeros((len(sets[other[side]]), len(sets[side]))) for side in sides}
    tasks = [(side, index) for side in to_tree for index in range(len(sets[side]))]

    def collect(task: tuple[str, int], means: np.ndarray) -> None:
        to_tree[task[0]][:, task[1]] = means

    directions = len(a) * (len(a) - 1) if symmetric else 2 * len(a) * len(sets["b"])
    _run_in_threads(run, tasks, collect, num_workers=num_workers, cpu=True,
                    progress_bar=dict(total=directions, desc="Chamfer distances (k-d trees)", unit="direction",
                                      disable=disable))
    if symmetric:
        matrix = to_tree["a"] + to_tree["a"].T
    else:
        matrix = to_tree["b"] + to_tree["a"].T
    return torch.from_numpy(matrix)


# ------------------------------------------------------------------------------------------- uniform grids (numba)
# Plain Python here, compiled by `_grid_kernels` on first use (importing numba costs ~0.5 s, so only when needed).
def _grid_build_py(clouds, points_per_cell):
    """One uniform grid per cloud: float64 ``(c, n, 3)`` -> (points sorted by cell, coordinates first ``(c, 3, n)``;
    cell starts, flat ``(sum of cells + 1,)``; each cloud's offset into them ``(c,)``; geometry ``(c, 6)`` = low
    corner xyz, cell side h, 1 / h, round-off tolerance in cells; cells per axis ``(c, 3)``).

    Cubic cells over the cloud's bounding box, ``floor(extent / h) + 1`` along each axis, ``h`` the smallest side
    (found by bisection) that keeps at most ``n / points_per_cell`` cells: a flat cloud gets 1 cell across its zero
    extent, a cloud of identical points 1 cell. A counting sort orders the points by cell ``(ix * D1 + iy) * D2 + iz``
    (points of cell ``c`` at ``starts[offset + c] .. starts[offset + c + 1] - 1``).
    """
    count, n = clouds.shape[0], clouds.shape[1]
    target = max(1, int(n / points_per_cell))
    geometry = np.zeros((count, 6))
    dims = np.ones((count, 3), dtype=np.int64)
    offsets = np.zeros(count + 1, dtype=np.int64)
    for c in range(count):
        low = np.empty(3)
        extent = np.empty(3)
        largest = 0.0  # the largest |coordinate|: scales the round-off of the cell coordinates
        for axis in range(3):
            low[axis] = clouds[c, 0, axis]
            high = clouds[c, 0, axis]
            for i in range(n):
                value = clouds[c, i, axis]
                low[axis] = min(low[axis], value)
                high = max(high, value)
                largest = max(largest, abs(value))
            extent[axis] = high - low[axis]
        longest = max(extent[0], max(extent[1], extent[2]))
        side = 1.0
        if longest > 0.0:
            small, big = longest / (target + 1), 2.0 * longest  # too many cells at `small`, one at `big`
            for _ in range(60):
                middle = np.sqrt(small * big)
                cells = 1.0
                for axis in range(3):
                    cells *= np.floor(extent[axis] / middle) + 1.0
                if cells <= target:
                    big = middle
                else:
                    small = middle
            side = big
            for axis in range(3):
                dims[c, axis] = int(np.floor(extent[axis] / side)) + 1
        for axis in range(3):
            geometry[c, axis] = low[axis]
        geometry[c, 3] = side
        geometry[c, 4] = 1.0 / side
        geometry[c, 5] = 1e-9 * (1.0 + largest / side)
        offsets[c + 1] = offsets[c] + dims[c, 0] * dims[c, 1] * dims[c, 2] + 1
    starts = np.zeros(offsets[count], dtype=np.int64)
    ordered = np.empty((count, 3, n))
    cell_of = np.empty(n, dtype=np.int64)
    for c in range(count):
        d0, d1, d2 = dims[c, 0], dims[c, 1], dims[c, 2]
        base = offsets[c]
        inverse = geometry[c, 4]
        for i in range(n):
            ix = min(max(int((clouds[c, i, 0] - geometry[c, 0]) * inverse), 0), d0 - 1)
            iy = min(max(int((clouds[c, i, 1] - geometry[c, 1]) * inverse), 0), d1 - 1)
            iz = min(max(int((clouds[c, i, 2] - geometry[c, 2]) * inverse), 0), d2 - 1)
            cell_of[i] = (ix * d1 + iy) * d2 + iz
            starts[base + cell_of[i] + 1] += 1
        for cell in range(d0 * d1 * d2):
            starts[base + cell + 1] += starts[base + cell]
        fill = starts[base:base + d0 * d1 * d2].copy()
        for i in range(n):
            cell = cell_of[i]
            slot = fill[cell]
            fill[cell] += 1
            for axis in range(3):
                ordered[c, axis, slot] = clouds[c, i, axis]
    return ordered, starts, offsets[:count].copy(), geometry, dims


def _grid_anchors_py(points, passes):
    """For every point of every cloud (``(c, 3, n)`` in cell order, `_grid_build_py`), its nearest point of the
    cloud's first pass (the points ``0, passes, 2 passes, ...``) -> (index ``// passes`` of that point ``(c, n)``
    int64, the distance to it ``(c, n)`` float64)."""
    count, n = points.shape[0], points.shape[2]
    anchors = np.zeros((count, n), dtype=np.int64)
    deltas = np.zeros((count, n))
    for c in range(count):
        for u in range(n):
            if u % passes == 0:
                anchors[c, u] = u // passes
                continue
            best, which = np.inf, 0
            for t in range(0, n, passes):
                dx, dy, dz = points[c, 0, t] - points[c, 0, u], points[c, 1, t] - points[c, 1, u], \
                    points[c, 2, t] - points[c, 2, u]
                squared = dx * dx + dy * dy + dz * dz
                if squared < best:
                    best, which = squared, t // passes
            anchors[c, u] = which
            deltas[c, u] = np.sqrt(best)
    return anchors, deltas


def _grid_pairs_py(first, second, limits, stop_after, passes, values, done, points_a, starts_a, offsets_a,
                   geometry_a, dims_a, anchors_a, deltas_a, points_b, starts_b, offsets_b, geometry_b, dims_b,
                   anchors_b, deltas_b):
    """Chamfer distances of the pairs ``(a[first[p]], b[second[p]])`` from the grids of `_grid_build_py`, pass by
    pass, stopping a pair early once it cannot be at most ``limits[p]``.

    Each direction queries the points of one cloud against the other cloud's grid, in ``passes`` interleaved passes
    (pass ``k``: the points ``k, k + passes, ...`` in cell order, so each pass is an even subsample of the cloud and
    consecutive queries are near each other), both directions per pass. After each pass, a lower bound of the
    distance: the exact terms so far plus, for every point not yet queried, ``max(0, d - delta)²`` where ``d`` is
    the exact nearest distance of its anchor (its nearest first-pass point, `_grid_anchors_py`, ``delta`` away: the
    distance to a cloud is 1-Lipschitz), shrunk by 1e-9 against round-off. A pair stops after ``stop_after`` passes
    or once its bound exceeds ``limits[p]``; ``values[p]`` gets the last bound and ``done[p]`` the passes done. With
    every pass done the bound is the Chamfer distance itself (``sum_a / n + sum_b / m``, the terms summed in the
    same order whatever the limits).

    One query: it starts from the distance to the previous query's nearest point (an upper bound ``best``) and
    searches Chebyshev shells ``k = 0, 1, ...`` of cells around its own cell (clamped into the grid), skipping ``x``
    slabs, ``(x, y)`` columns and ``z`` cells whose distance to the query is at least ``best`` (the cells of one
    column are consecutive, so a column is one run of points, empty cells cost nothing). It stops when ``best`` is at
    most the lower bound of every cell outside the searched box (beyond one of its faces: the distance to that face
    plus the query's distance to the grid along the other two axes, so a query far outside the grid stops early) or
    when the box covers the grid. Bounds are shrunk by 1e-9 cells, scaled by the coordinates' magnitude, against
    round-off: the minimum is exact. Squared distances are direct float64 differences.
    """
    num_pairs = first.shape[0]
    inf = np.inf
    n_a, n_b = points_a.shape[2], points_b.shape[2]
    nearest_a = np.zeros(-(-n_a // passes))  # the exact nearest distances of the first pass's queries
    nearest_b = np.zeros(-(-n_b // passes))
    sums = np.zeros(2)
    rest = np.zeros((2, passes))  # lower bounds of the terms of each later pass
    for p in range(num_pairs):
        i, j = first[p], second[p]
        previous_0, previous_1 = -1, -1
        sums[:] = 0.0
        rest[:, :] = 0.0
        for current in range(passes):
            for direction in range(2):
                if direction == 0:  # the points of a_i against the grid of b_j
                    queries, grid, starts = points_a[i], points_b[j], starts_b
                    offset, geometry, dims = offsets_b[j], geometry_b[j], dims_b[j]
                    previous = previous_0
                    first_nearest = nearest_a
                else:
                    queries, grid, starts = points_b[j], points_a[i], starts_a
                    offset, geometry, dims = offsets_a[i], geometry_a[i], dims_a[i]
                    previous = previous_1
                    first_nearest = nearest_b
                lx, ly, lz, side, inverse, tolerance = (geometry[0], geometry[1], geometry[2], geometry[3],
                                                        geometry[4], geometry[5])
                d0, d1, d2 = dims[0], dims[1], dims[2]
                accumulated = sums[direction]
                for t in range(current, queries.shape[1], passes):
                    qx, qy, qz = queries[0, t], queries[1, t], queries[2, t]
                    ux, uy, uz = (qx - lx) * inverse, (qy - ly) * inverse, (qz - lz) * inverse  # in cells
                    cx = 0 if ux <= 0.0 else (d0 - 1 if ux >= d0 - 1 else int(ux))
                    cy = 0 if uy <= 0.0 else (d1 - 1 if uy >= d1 - 1 else int(uy))
                    cz = 0 if uz <= 0.0 else (d2 - 1 if uz >= d2 - 1 else int(uz))
                    tol = tolerance + 1e-9 * max(abs(qx), max(abs(qy), abs(qz))) * inverse
                    # distances (in cells) from the query to the grid along each axis, 0 inside
                    ox = max(0.0, max(-ux, ux - d0) - tol)
                    oy = max(0.0, max(-uy, uy - d1) - tol)
                    oz = max(0.0, max(-uz, uz - d2) - tol)
                    best = inf
                    nearest = -1
                    if previous >= 0:  # the previous query's nearest point: an upper bound from the start
                        dx, dy, dz = grid[0, previous] - qx, grid[1, previous] - qy, grid[2, previous] - qz
                        best = dx * dx + dy * dy + dz * dz
                        nearest = previous
                    k = 0
                    while True:
                        x0, x1, y0, y1, z0, z1 = cx - k, cx + k, cy - k, cy + k, cz - k, cz + k  # the shell's box
                        for ix in range(max(x0, 0), min(x1, d0 - 1) + 1):
                            gx = max(0.0, max(ix - ux, ux - ix - 1.0) - tol) * side
                            gx2 = gx * gx
                            if gx2 >= best:
                                continue
                            edge_x = ix == x0 or ix == x1
                            for iy in range(max(y0, 0), min(y1, d1 - 1) + 1):
                                gy = max(0.0, max(iy - uy, uy - iy - 1.0) - tol) * side
                                gxy2 = gx2 + gy * gy
                                if gxy2 >= best:
                                    continue
                                # the z cells of this column that can still hold a point nearer than `best`
                                za, zb = max(z0, 0), min(z1, d2 - 1)
                                if best < inf:
                                    reach = np.sqrt(best - gxy2) * inverse + tol
                                    below, above = uz - reach - 1.0, uz + reach
                                    if below > za:
                                        za = int(below)
                                    if above < zb:
                                        zb = int(above) if above >= 0.0 else -1
                                column = offset + (ix * d1 + iy) * d2
                                if edge_x or iy == y0 or iy == y1:  # on the shell: one run of consecutive cells
                                    if za <= zb:
                                        for s in range(starts[column + za], starts[column + zb + 1]):
                                            dx, dy, dz = grid[0, s] - qx, grid[1, s] - qy, grid[2, s] - qz
                                            squared = dx * dx + dy * dy + dz * dz
                                            if squared < best:
                                                best = squared
                                                nearest = s
                                else:  # inside the shell's footprint: only its two z ends are new
                                    for iz in (z0, z1):
                                        if iz >= za and iz <= zb:
                                            for s in range(starts[column + iz], starts[column + iz + 1]):
                                                dx, dy, dz = grid[0, s] - qx, grid[1, s] - qy, grid[2, s] - qz
                                                squared = dx * dx + dy * dy + dz * dz
                                                if squared < best:
                                                    best = squared
                                                    nearest = s
                        # lower bound (in cells, squared) of the cells outside the searched box
                        bound = inf
                        if x0 > 0:
                            face = max(0.0, ux - x0 - tol)
                            bound = min(bound, face * face + oy * oy + oz * oz)
                        if x1 < d0 - 1:
                            face = max(0.0, x1 + 1 - ux - tol)
                            bound = min(bound, face * face + oy * oy + oz * oz)
                        if y0 > 0:
                            face = max(0.0, uy - y0 - tol)
                            bound = min(bound, face * face + ox * ox + oz * oz)
                        if y1 < d1 - 1:
                            face = max(0.0, y1 + 1 - uy - tol)
                            bound = min(bound, face * face + ox * ox + oz * oz)
                        if z0 > 0:
                            face = max(0.0, uz - z0 - tol)
                            bound = min(bound, face * face + ox * ox + oy * oy)
                        if z1 < d2 - 1:
                            face = max(0.0, z1 + 1 - uz - tol)
                            bound = min(bound, face * face + ox * ox + oy * oy)
                        if bound == inf or bound * side * side >= best:
                            break
                        k += 1
                    accumulated += best
                    previous = nearest
                    if current == 0:
                        first_nearest[t // passes] = np.sqrt(best)
                sums[direction] = accumulated
                if direction == 0:
                    previous_0 = previous
                else:
                    previous_1 = previous
            if current == 0:  # Lipschitz bounds of the other passes' terms from the first pass's
                for direction in range(2):
                    if direction == 0:
                        anchors, deltas, first_nearest, count = anchors_a[i], deltas_a[i], nearest_a, n_a
                    else:
                        anchors, deltas, first_nearest, count = anchors_b[j], deltas_b[j], nearest_b, n_b
                    for u in range(count):
                        if u % passes:
                            near, delta = first_nearest[anchors[u]], deltas[u]
                            gap = max(0.0, near - delta - 1e-9 * (near + delta))
                            rest[direction, u % passes] += gap * gap
            total_a, total_b = sums[0], sums[1]
            for later in range(current + 1, passes):
                total_a += rest[0, later] * (1.0 - 1e-9)
                total_b += rest[1, later] * (1.0 - 1e-9)
            values[p] = total_a / n_a + total_b / n_b
            done[p] = current + 1
            if values[p] > limits[p] or current + 1 == stop_after:
                break


_GRID_KERNELS = None


def _grid_kernels():
    """``(build, pairs)``: `_grid_build_py` and `_grid_pairs_py` compiled by numba (nogil, so threads run them in
    parallel; cached on disk); raises ImportError without numba."""
    global _GRID_KERNELS
    if _GRID_KERNELS is None:
        import numba

        jit = numba.njit(cache=True, nogil=True, fastmath=False)
        _GRID_KERNELS = jit(_grid_build_py), jit(_grid_pairs_py), jit(_grid_anchors_py)
    return _GRID_KERNELS


_NUMBA_CHECKED: list = []  # [bool] once checked


def _numba_available() -> bool:
    """Whether numba imports; logs once when it does not (``"auto"`` then falls back to ``"kdtree"``)."""
    if not _NUMBA_CHECKED:
        try:
            import numba  # noqa: F401

            _NUMBA_CHECKED.append(True)
        except ImportError as error:  # pragma: no cover - numba is a dependency
            logger.warning("numba is not importable (%s): Chamfer distances on the CPU fall back to method='kdtree' "
                           "(several times slower); pip install 'numba>=0.60'", error)
            _NUMBA_CHECKED.append(False)
    return _NUMBA_CHECKED[0]


def _grid_run(grids_a, grids_b, first, second, limits, stop_after, *, num_workers: int, bar: dict):
    """`_grid_pairs_py` over the pairs ``(first[p], second[p])``, in spans run by ``num_workers`` threads ->
    ``(values, done)`` ``(p,)``: each pair's last bound (its distance where ``done == GRID_PASSES``) and passes done."""
    _, pairs_kernel, _ = _grid_kernels()
    num_pairs = len(first)
    values, done = np.zeros(num_pairs), np.zeros(num_pairs, dtype=np.int64)
    # Spans of ~16 per worker balance the load; at most GRID_SPAN_PAIRS pairs keeps the progress bar moving.
    span_pairs = max(1, min(GRID_SPAN_PAIRS, -(-num_pairs // (16 * num_workers))))
    spans = [(start, min(start + span_pairs, num_pairs)) for start in range(0, num_pairs, span_pairs)]

    def run(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        part = slice(*span)
        span_values, span_done = np.zeros(span[1] - span[0]), np.zeros(span[1] - span[0], dtype=np.int64)
        pairs_kernel(first[part], second[part], limits[part], stop_after, GRID_PASSES, span_values, span_done,
                     *grids_a, *grids_b)
        return span_values, span_done

    def collect(span: tuple[int, int], result) -> None:
        values[span[0]:span[1]], done[span[0]:span[1]] = result

    _run_in_threads(run, spans, collect, num_workers=num_workers, cpu=True, progress_bar=bar,
                    size=lambda result: len(result[1]))
    return values, done


def _grids(clouds: np.ndarray) -> tuple:
    """Everything `_grid_pairs_py` needs of a set of clouds: `_grid_build_py`'s grid, then `_grid_anchors_py`."""
    build, _, anchors = _grid_kernels()
    grid = build(clouds, GRID_POINTS_PER_CELL)
    return (*grid, *anchors(grid[0], GRID_PASSES))


def _all_pairs(count_a: int, count_b: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(first, second)`` int64: every pair of ``a x b``, or ``i < j`` within ``a`` when ``count_b is None``."""
    if count_b is None:
        first, second = np.triu_indices(count_a, k=1)
    else:
        first, second = np.divmod(np.arange(count_a * count_b), count_b)
    return first.astype(np.int64), second.astype(np.int64)


def _chamfer_grid(a: np.ndarray, b: np.ndarray | None, *, num_workers: int, disable: bool | None) -> torch.Tensor:
    """The ``"grid"`` method: float64 ``(a, n, 3)``, ``(b, m, 3)`` (``None``: within ``a``) -> ``(a, b)`` float64.

    One grid per cloud (`_grids`), then blocks of pairs, each pair's two directions, every pass (`_grid_pairs_py`);
    the workers run the compiled kernel without the GIL.
    """
    symmetric = b is None
    grids_a = _grids(a)
    grids_b = grids_a if symmetric else _grids(b)
    count_b = len(a) if symmetric else len(b)
    first, second = _all_pairs(len(a), None if symmetric else count_b)
    values, _ = _grid_run(grids_a, grids_b, first, second, np.full(len(first), np.inf), GRID_PASSES,
                          num_workers=num_workers,
                          bar=dict(total=len(first), desc="Chamfer distances (grid)", unit="pair", disable=disable))
    matrix = np.zeros((len(a), count_b))
    matrix[first, second] = values
    if symmetric:
        matrix = matrix + matrix.T
    return torch.from_numpy(matrix)


def _grid_minima(grids_a, grids_b, first: np.ndarray, second: np.ndarray, groups: np.ndarray, num_groups: int, *,
                 num_workers: int, disable: bool | None) -> np.ndarray:
    """Chamfer distances of the pairs ``(first[p], second[p])`` of two sets of grids (`_grids`) that can be the
    smallest of one of their groups, ``inf`` for the others -> ``(p,)`` float64.

    ``groups`` ``(p, g)`` int64 lists the groups of each pair (``-1``: none) out of ``num_groups``. Every group's
    minimum, and every pair that ties with it, comes out exact and equal to `_chamfer_grid`'s value (the same sums in
    the same order). Branch and bound on the passes of `_grid_pairs_py`:

    1. The first pass of every pair (about 1 / GRID_PASSES of the work): a lower bound of each distance, which also
       ranks the pairs.
    2. For each group, its pair of smallest bound, in full: each group's best so far.
    3. The other pairs in rising order of bound, in blocks of GRID_MINIMA_BLOCK: a pair's limit is the largest best
       of its groups. A pair whose bound is above its limit is dropped (it is above every one of its groups'
       minima); the others run pass by pass until they finish or their bound passes the limit. Finished pairs lower
       their groups' bests, which tightens the next blocks' limits.
    """
    num_pairs = len(first)
    values = np.full(num_pairs, np.inf)
    best = np.full(num_groups, np.inf)
    listed = groups >= 0
    pair_bar = dict(unit="pair", disable=disable)

    def finish(index: np.ndarray, limits: np.ndarray, bar: dict) -> None:
        found, done = _grid_run(grids_a, grids_b, first[index], second[index], limits, GRID_PASSES,
                                num_workers=num_workers, bar=bar)
        whole = done == GRID_PASSES
        values[index[whole]] = found[whole]
        for column in range(groups.shape[1]):
            keep = whole & (groups[index, column] >= 0)
            np.minimum.at(best, groups[index[keep], column], found[keep])

    # 1. the first pass of every pair
    lower, _ = _grid_run(grids_a, grids_b, first, second, np.full(num_pairs, np.inf), 1, num_workers=num_workers,
                         bar=dict(total=num_pairs, desc=f"Chamfer bounds (first of {GRID_PASSES} passes)", **pair_bar))
    order = np.argsort(lower, kind="stable")
    # 2. each group's most promising pair, in full
    seeds = np.zeros(num_pairs, dtype=bool)
    for column in range(groups.shape[1]):
        ranked = order[groups[order, column] >= 0]
        _, first_of_group = np.unique(groups[ranked, column], return_index=True)
        seeds[ranked[first_of_group]] = True
    seed_index = np.flatnonzero(seeds)
    finish(seed_index, np.full(len(seed_index), np.inf),
           dict(total=len(seed_index), desc="Chamfer distances (one candidate per group)", **pair_bar))
    # 3. the others, most promising first, dropped as soon as they cannot be a minimum
    rest = order[~seeds[order]]
    with tqdm(total=len(rest), desc="Chamfer distances (the other candidates)", leave=False, **pair_bar) as bar:
        for start in range(0, len(rest), GRID_MINIMA_BLOCK):
            index = rest[start:start + GRID_MINIMA_BLOCK]
            limits = np.where(listed[index], best[np.maximum(groups[index], 0)], -np.inf).max(1)
            keep = lower[index] <= limits
            if keep.any():
                finish(index[keep], limits[keep], {"disable": True})
            bar.update(len(index))
    return values


def _chamfer_settings(method: str, device, dtype: torch.dtype, num_workers) -> tuple[str, torch.device, int]:
    """Checked ``(method with "auto" resolved, device, num_workers)`` of the Chamfer functions."""
    device = _resolve_device(device)
    if method not in CHAMFER_METHODS:
        raise ValueError(f"method must be one of {CHAMFER_METHODS}, got {method!r}")
    if method == "auto":
        method = ("grid" if _numba_available() else "kdtree") if device.type == "cpu" else "dense"
    if method in ("grid", "kdtree") and device.type != "cpu":
        raise ValueError(f"method={method!r} runs on the CPU, got device={str(device)!r}; pass device='cpu' or "
                         f"method='dense'")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    num_workers = (torch.get_num_threads() if device.type == "cpu" else 1) if num_workers is None else num_workers
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    return method, device, num_workers


def _as_float64(clouds: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(clouds.double().numpy())


def _chamfer_grid_nearest(a: np.ndarray, b: np.ndarray | None, *, num_workers: int,
                          disable: bool | None) -> torch.Tensor:
    """``chamfer_distance_matrix(nearest_only=True)`` with the grids: each row's minimum (and ties) exact."""
    symmetric = b is None
    grids_a = _grids(a)
    grids_b = grids_a if symmetric else _grids(b)
    count_b = len(a) if symmetric else len(b)
    first, second = _all_pairs(len(a), None if symmetric else count_b)
    groups = np.stack([first, second], 1) if symmetric else first[:, None]  # the rows each pair can be nearest in
    values = _grid_minima(grids_a, grids_b, first, second, groups, len(a), num_workers=num_workers, disable=disable)
    matrix = np.full((len(a), count_b), np.inf)
    matrix[first, second] = values
    if symmetric:
        matrix[second, first] = values
        np.fill_diagonal(matrix, 0.0)
    return torch.from_numpy(matrix)


def chamfer_nearest_matrices(
    samples,
    references,
    *,
    method: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The S-R, S-S and R-R Chamfer matrices with exact values wherever MMD, COV and 1-NNA look.

    `mmd_cov_1nna` reads only minima: each reference's nearest sample (MMD), each sample's nearest reference
    (COV), and each item's nearest other item in R ∪ S (1-NNA), ties included. With the ``"grid"`` method (the CPU
    default) only the pairs that can be one of those are finished (`_grid_minima`: about 1/16 of the work for every
    pair, then a fraction of the pairs in full); the others come back ``inf``. Every finite entry equals
    `chamfer_distance_matrix`'s, so the metrics are identical (``mmd_cov_1nna(..., allow_inf=True)``). Measured
    (benchmarks/RESULTS.md): 1,000 x 1,000 surface clouds of 2,048 points in 4.5 min on 2 CPU cores, 14x the full
    matrices; 300 + 300 real ModelNet chairs on one core in 105 s against 570 s (5.4x). The gain grows with the
    number of clouds (nearer neighbours, tighter limits) and vanishes when all distances are nearly equal (clouds
    drawn from one Gaussian). Other methods compute the full matrices.

    Args:
        samples: ``(s, n, 3)`` generated clouds (see `as_point_clouds`); normalise first (`normalize_point_clouds`).
        references: ``(r, m, 3)`` real clouds.
        method, device, dtype, num_workers, progress: as in `chamfer_distance_matrix`.

    Returns:
        ``(dist_sr (s, r), dist_ss (s, s), dist_rr (r, r))`` float64 tensors, ``inf`` where a pair was dropped.
    """
    common = dict(method=method, device=device, dtype=dtype, num_workers=num_workers, progress=progress)
    resolved, _, num_workers = _chamfer_settings(method, device, dtype, num_workers)
    if resolved != "grid":
        return (chamfer_distance_matrix(samples, references, **common), chamfer_distance_matrix(samples, **common),
                chamfer_distance_matrix(references, **common))
    s = _as_float64(as_point_clouds(samples, "samples").to(dtype))
    r = _as_float64(as_point_clouds(references, "references").to(dtype))
    if s.shape[1] != r.shape[1]:  # one grid set for R ∪ S needs one cloud size
        return (chamfer_distance_matrix(samples, references, **common),
                chamfer_distance_matrix(samples, **common), chamfer_distance_matrix(references, **common))
    union = np.concatenate([s, r])  # samples first, then references
    count, num_s = len(union), len(s)
    grids = _grids(union)
    first, second = _all_pairs(count, None)
    cross = (first < num_s) & (second >= num_s)
    # groups: each item's nearest (0 .. count-1), each sample's nearest reference (count + i), each reference's
    # nearest sample (count + j, j >= num_s)
    groups = np.stack([first, second, np.where(cross, count + first, -1), np.where(cross, count + second, -1)], 1)
    values = _grid_minima(grids, grids, first, second, groups, 2 * count, num_workers=num_workers,
                          disable=None if progress is None else not progress)
    matrix = np.full((count, count), np.inf)
    matrix[first, second] = values
    matrix[second, first] = values
    np.fill_diagonal(matrix, 0.0)
    matrix = torch.from_numpy(matrix)
    return (matrix[:num_s, num_s:].contiguous(), matrix[:num_s, :num_s].contiguous(),
            matrix[num_s:, num_s:].contiguous())


def chamfer_distance_matrix(
    clouds_a,
    clouds_b=None,
    *,
    method: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
    nearest_only: bool = False,
) -> torch.Tensor:
    """Squared-L2 Chamfer distances between every cloud of ``clouds_a`` and every cloud of ``clouds_b``.

    Args:
        clouds_a: ``(a, n, 3)`` array/tensor or list of ``(n, 3)`` arrays (see `as_point_clouds`).
        clouds_b: ``(b, m, 3)`` likewise (``m`` may differ from ``n``); ``None`` for the distances within
            ``clouds_a`` (symmetric: each pair of different clouds is computed once, the diagonal is 0).
        method: ``"grid"`` (CPU only, needs numba), ``"kdtree"`` (CPU only), ``"dense"`` (any device) or ``"auto"``
            (default: ``"grid"`` on the CPU, ``"kdtree"`` there when numba does not import (logged once),
            ``"dense"`` elsewhere); all are exact (module docstring).
        device: where to compute (``"cpu"``, ``"cuda"``, ...); the result always comes back on the CPU.
        dtype: the points are rounded to ``dtype`` first; float32 (default) matches HyperDiffusion. ``"dense"``
            also computes in it (float64 is exact to ~1e-15 and ~2x slower); ``"grid"`` and ``"kdtree"`` always
            measure the rounded points in float64.
        chunk_elements: ``"dense"`` only: point-to-point distances held at once per worker (bounds memory).
        num_workers: CPU only: threads that each take whole units of work (default: ``torch.get_num_threads()``);
            torch runs single-threaded meanwhile (restored afterwards). Measured on the shared 2-core machines:
            torch's own 2-thread ops took 535 ms per pair of 2,048-point clouds against 23 ms single-threaded,
            since every small op waits at a barrier for a thread that another job has descheduled; whole units
            per thread have no such barrier.
        progress: show a progress bar (``None``: only on a terminal).
        nearest_only: only each row's nearest cloud matters (e.g. the distance of each sample to its nearest
            training item): with ``"grid"``, entries proven larger than their row's minimum come back ``inf``
            (`_grid_minima`); each row's minimum and the entries that tie with it are exact and equal to the full
            matrix's. Other methods compute every entry.

    Returns:
        ``(a, b)`` float64 tensor: ``CD[i, j] = mean_n min_m |a_i,n - b_j,m|² + mean_m min_n |a_i,n - b_j,m|²``.
        Clouds are used as given: normalise them first (`normalize_point_clouds`) for HyperDiffusion's protocol.
    """
    method, device, num_workers = _chamfer_settings(method, device, dtype, num_workers)
    if method != "dense" and chunk_elements is not None:
        raise ValueError(f"chunk_elements applies to method='dense' only, got chunk_elements={chunk_elements!r} "
                         f"with method={method!r}")
    chunk_elements = _default_chunk_elements(device) if chunk_elements is None else chunk_elements
    _check_chunk_elements(chunk_elements)
    a = as_point_clouds(clouds_a, "clouds_a").to(dtype)
    b = None if clouds_b is None else as_point_clouds(clouds_b, "clouds_b").to(dtype)
    disable = None if progress is None else not progress
    if method == "grid" and nearest_only:
        return _chamfer_grid_nearest(_as_float64(a), None if b is None else _as_float64(b), num_workers=num_workers,
                                     disable=disable)
    if method in ("grid", "kdtree"):
        as_array = _as_float64
        run = _chamfer_grid if method == "grid" else _chamfer_kdtree
        return run(as_array(a), None if b is None else as_array(b), num_workers=num_workers, disable=disable)
    return _chamfer_dense(a.to(device), None if b is None else b.to(device), chunk_elements=chunk_elements,
                          num_workers=num_workers, disable=disable).cpu()


# ------------------------------------------------------------------------------------------- images
def as_images(images, name: str = "images") -> torch.Tensor:
    """Check a set of images and return it as a ``(b, H, W, C)`` float64 tensor in ``[0, 1]`` on the CPU.

    Accepts ``(b, H, W)`` or ``(b, H, W, C)`` arrays/tensors or lists of per-image arrays: uint8 in 0..255
    (divided by 255) or floating in ``[0, 1]`` (as `nef_transformers.fields.render_images` returns). Raises
    `ValueError` naming the first offending image for empty sets, ragged lists, NaN or inf and out-of-range values.
    """
    if isinstance(images, (list, tuple)):
        for index, item in enumerate(images):
            if item is not None and np.ndim(item) not in (2, 3):
                raise ValueError(f"{name}[{index}] must be an (H, W) or (H, W, C) image, got shape {np.shape(item)}")
    tensor = _stack_items(images, name, "images")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 4:
        raise ValueError(f"{name} must have shape (b, H, W) or (b, H, W, C), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.double() / 255.0
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0..255) or floating in [0, 1], got dtype {tensor.dtype}")
    tensor = tensor.double()
    bad = _first_nonfinite(tensor)
    if bad is not None:
        raise ValueError(f"{name}[{bad}] contains NaN or inf")
    outside = ((tensor < 0) | (tensor > 1)).flatten(1).any(1)
    if outside.any():
        index = int(outside.nonzero()[0, 0])
        raise ValueError(f"{name}[{index}] has values outside [0, 1] (range [{float(tensor[index].min()):.4g}, "
                         f"{float(tensor[index].max()):.4g}]); pass floating images in [0, 1] or uint8 in 0..255")
    return tensor


def image_distance_matrix(
    images_a,
    images_b=None,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> torch.Tensor:
    """Pixel-space squared L2, averaged over pixels and channels, between every image of two sets.

    Args:
        images_a: ``(a, H, W[, C])`` images (see `as_images`).
        images_b: ``(b, H, W[, C])`` images of the same shape; ``None`` for the distances within ``images_a``.
        device: where to compute; the result comes back on the CPU.
        chunk_size: images of ``images_a`` per matrix product (bounds memory).
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        ``(a, b)`` float64 tensor ``D[i, j] = mean((a_i - b_j)²)`` (computed in float64).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    device = _resolve_device(device)
    a = as_images(images_a, "images_a")
    b = a if images_b is None else as_images(images_b, "images_b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mismatched image shapes: images_a are {tuple(a.shape[1:])} (H, W, C) but images_b are "
                         f"{tuple(b.shape[1:])}; compare images of one shape")
    pixels = a[0].numel()
    a, b = a.flatten(1).to(device), b.flatten(1).to(device)  # (a, d), (b, d)
    a_sq, b_sq = (a * a).sum(1), (b * b).sum(1)
    eps = torch.finfo(torch.float64).eps * SNAP_ULPS
    out = torch.empty(len(a), len(b), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(a), chunk_size), desc="image distances", leave=False,
                      disable=None if progress is None else not progress):
        rows = slice(start, start + chunk_size)
        scale = a_sq[rows, None] + b_sq[None, :]  # (r, b)
        block = scale - 2.0 * a[rows] @ b.T
        out[rows] = torch.where(block < eps * scale, 0.0, block) / pixels
    return out.cpu()


__all__ = ["as_images", "as_point_clouds", "chamfer_distance_matrix", "image_distance_matrix",
           "normalize_point_clouds"]
