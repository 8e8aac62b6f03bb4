"""Tests of the occupancy sources in nef_transformers.data.shapes (voxel grids and mesh folders)."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import trimesh

from nef_transformers.data import shapes
from nef_transformers.data.shapes import (
    MeshFolderSource,
    VoxelGridSource,
    fill_shells,
    load_normalized_mesh,
    load_shape_source,
    winding_numbers,
    winding_numbers_torch,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA} (../shared/data)")
try:
    import igl

    HAS_IGL = True
except ImportError:
    igl = None
    HAS_IGL = False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def sphere_grid(resolution=32, radius=0.3):
    centres = (np.arange(resolution) + 0.5) / resolution - 0.5
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2) < radius


def write_mesh(mesh, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


def box_without_side():
    """An axis-aligned box with its +x side (two triangles) removed: open, not watertight."""
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    keep = box.face_normals[:, 0] < 0.5
    return trimesh.Trimesh(box.vertices, box.faces[keep], process=False)


# ------------------------------------------------------------------------------------------- voxel grids
def test_solid_sphere_occupancy_matches_analytic_away_from_boundary():
    radius, resolution = 0.3, 32
    source = VoxelGridSource(sphere_grid(resolution, radius)[None], fill=False)
    for split in ("train", "eval"):
        coords, occupancy = source.points([0], 8192, split=split, seed=3)
        assert coords.shape == (1, 8192, 3) and occupancy.shape == (1, 8192, 1)
        assert coords.dtype == torch.float32 and occupancy.dtype == torch.float32
        assert coords.min() >= -0.5 and coords.max() <= 0.5
        assert set(occupancy.unique().tolist()) == {0.0, 1.0}
        distance = coords[0].double().norm(dim=-1)
        clear = (distance - radius).abs() > np.sqrt(3) / resolution  # farther than a voxel diagonal
        assert clear.sum() > 1000
        expected = (distance < radius).double()
        assert torch.equal(occupancy[0, :, 0].double()[clear], expected[clear])


def test_point_occupancy_is_the_containing_voxel():
    rng = np.random.default_rng(0)
    voxels = rng.random((3, 8, 8, 8)) < 0.5
    source = VoxelGridSource(voxels, fill=False)
    coords, occupancy = source.points([2, 0], 2000, split="eval")
    cells = np.clip(np.floor((coords.numpy().astype(np.float64) + 0.5) * 8).astype(int), 0, 7)
    for row, index in enumerate([2, 0]):
        expected = voxels[index][cells[row, :, 0], cells[row, :, 1], cells[row, :, 2]]
        np.testing.assert_array_equal(occupancy[row, :, 0].numpy(), expected.astype(np.float32))


def test_shell_sphere_is_filled():
    solid = sphere_grid(24, 0.35)
    shell = solid & ~scipy.ndimage.binary_erosion(solid)
    assert shell.sum() < solid.sum() / 2
    filled = VoxelGridSource(np.stack([shell, solid]))
    np.testing.assert_array_equal(filled.voxels[0], solid)
    np.testing.assert_array_equal(filled.voxels[1], solid)
    kept = VoxelGridSource(shell[None], fill=False)
    np.testing.assert_array_equal(kept.voxels[0], shell)


def test_batched_fill_equals_binary_fill_holes_per_grid():
    rng = np.random.default_rng(1)
    grids = []
    for _ in range(10):
        grid = np.zeros((16, 16, 16), dtype=bool)
        for _ in range(3):  # hollow boxes, some opened by a hole, some touching the border
            low = rng.integers(0, 10, 3)
            high = low + rng.integers(3, 7, 3)
            box = np.zeros_like(grid)
            box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
            grid |= box & ~scipy.ndimage.binary_erosion(box)
            if rng.random() < 0.4:
                grid[low[0], (low[1] + high[1]) // 2, (low[2] + high[2]) // 2] = False
        grids.append(grid)
    grids = np.stack(grids)
    expected = np.stack([scipy.ndimage.binary_fill_holes(g) for g in grids])
    np.testing.assert_array_equal(fill_shells(grids, chunk=3), expected)
    assert (expected.sum() > grids.sum())  # the test data has cavities to fill


@pytest.mark.parametrize(
    "voxels, message",
    [
        (np.zeros((2, 4, 4, 5), dtype=bool), r"\(2, 4, 4, 5\)"),
        (np.zeros((4, 4, 4), dtype=bool), r"\(4, 4, 4\)"),
        (np.zeros((0, 4, 4, 4), dtype=bool), "empty"),
        (np.full((1, 4, 4, 4), 2, dtype=np.int64), "0/1"),
        (np.full((1, 4, 4, 4), 0.5), "0/1"),
        (np.full((1, 4, 4, 4), "a"), "dtype"),
        (np.zeros((2, 4, 4, 4), dtype=bool), "no occupied voxel"),
    ],
)
def test_invalid_voxels_raise(voxels, message):
    with pytest.raises(ValueError, match=message):
        VoxelGridSource(voxels, name="bad")


def test_zero_one_numbers_are_accepted_and_labels_validated():
    grid = sphere_grid(8, 0.3)[None]
    source = VoxelGridSource(grid.astype(np.uint8), fill=False)
    assert source.voxels.dtype == bool and np.array_equal(source.voxels, grid)
    np.testing.assert_array_equal(source.labels, [0])
    assert source.labels.dtype == np.int64
    with pytest.raises(ValueError, match="labels"):
        VoxelGridSource(grid, labels=np.array([0, 1]))


def test_points_argument_errors():
    source = VoxelGridSource(sphere_grid(8, 0.3)[None])
    with pytest.raises(ValueError, match="split"):
        source.points([0], 10, split="test")
    with pytest.raises(ValueError, match=r"0\.\.0"):
        source.points([1], 10)
    with pytest.raises(ValueError, match="num_points"):
        source.points([0], 0)
    with pytest.raises(ValueError, match="seed"):
        source.points([0], 10, seed=-1)


def test_points_are_deterministic_per_shape_and_split():
    grids = np.stack([sphere_grid(16, r) for r in (0.2, 0.3, 0.4)])
    source = VoxelGridSource(grids, fill=False)
    coords_a, occ_a = source.points([0, 1, 2], 1000, seed=5)
    coords_b, occ_b = source.points([2, 1], 1000, seed=5)
    assert torch.equal(coords_a[2], coords_b[0]) and torch.equal(coords_a[1], coords_b[1])
    assert torch.equal(occ_a[2], occ_b[0])
    again, _ = source.points([0, 1, 2], 1000, seed=5)
    assert torch.equal(again, coords_a)
    other_seed, _ = source.points([0], 1000, seed=6)
    assert not torch.allclose(other_seed[0], coords_a[0])
    assert not torch.allclose(coords_a[0], coords_a[1])  # shapes get their own streams
    eval_coords, _ = source.points([0, 1, 2], 1000, split="eval", seed=5)
    train_set = {tuple(p) for p in coords_a.reshape(-1, 3).tolist()}
    assert not any(tuple(p) in train_set for p in eval_coords.reshape(-1, 3).tolist())


def test_train_points_concentrate_near_the_surface():
    radius, resolution = 0.3, 32
    source = VoxelGridSource(sphere_grid(resolution, radius)[None], fill=False)
    train, train_occ = source.points([0], 4000, split="train")
    evaluation, _ = source.points([0], 4000, split="eval")
    near = lambda c: ((c[0].norm(dim=-1) - radius).abs() < 2 / resolution).float().mean().item()  # noqa: E731
    assert near(train) > 0.45 and near(evaluation) < 0.2
    assert 0.3 < train_occ.mean().item() < 0.7  # near-surface points straddle the boundary


def test_describe_is_json():
    source = VoxelGridSource(sphere_grid(8, 0.3)[None], class_names=["ball"], name="balls")
    described = json.loads(json.dumps(source.describe()))
    assert described == {"kind": "occupancy", "name": "balls", "class_names": ["ball"], "resolution": 8}
    assert source.kind == "occupancy" and source.in_dim == 3 and source.out_dim == 1 and len(source) == 1


@pytest.fixture(scope="module")
def chairs():
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA} (../shared/data)")
    return VoxelGridSource.from_npz(DATA / "shapes" / "modelnet10_chair_32.npz")


@needs_data
def test_real_chairs_load_and_fill(chairs):
    shells = np.load(DATA / "shapes" / "modelnet10_chair_32.npz")["voxels"]
    assert len(chairs) == 889 and chairs.resolution == 32 and chairs.name == "modelnet10_chair_32"
    fraction = chairs.voxels.mean()
    assert 0 < fraction < 0.5
    assert fraction > shells.mean() and (chairs.voxels | ~shells).all()  # filling only adds voxels
    coords, occupancy = chairs.points(np.arange(256), 16384)
    assert coords.shape == (256, 16384, 3) and occupancy.shape == (256, 16384, 1)
    assert 0.1 < occupancy.mean().item() < 0.9


@needs_data
def test_from_npz_options_and_errors(tmp_path):
    few = VoxelGridSource.from_npz(DATA / "shapes" / "modelnet10_chair_32.npz", num_shapes=3, fill=False)
    assert len(few) == 3
    with pytest.raises(ValueError, match="'grids'"):
        VoxelGridSource.from_npz(DATA / "shapes" / "modelnet10_chair_32.npz", key="grids")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz"):
        VoxelGridSource.from_npz(garbage)


# ------------------------------------------------------------------------------------------- meshes
def test_winding_number_of_watertight_sphere_matches_analytic(tmp_path):
    write_mesh(trimesh.creation.icosphere(subdivisions=3, radius=2.0), tmp_path / "ball" / "sphere.off")
    source = MeshFolderSource(tmp_path / "ball")
    assert len(source) == 1 and source.class_names == [] and source.labels.tolist() == [0]
    coords, occupancy = source.points([0], 3000, split="eval")
    distance = coords[0].double().norm(dim=-1)
    clear = (distance - 0.475).abs() > 0.01  # the icosphere's facets sag < 0.002 below the sphere
    assert torch.equal(occupancy[0, :, 0].double()[clear], (distance < 0.475).double()[clear])


def test_winding_number_of_box_matches_analytic(tmp_path):
    write_mesh(trimesh.creation.box(extents=(2.0, 1.0, 0.5)), tmp_path / "box.ply")
    coords, occupancy = MeshFolderSource(tmp_path).points([0], 3000, split="eval")
    half = torch.tensor([0.475, 0.2375, 0.11875])  # normalised: the longest half-extent becomes 0.475
    inside = (coords[0].abs() < half).all(-1)
    clear = ((coords[0].abs() - half).abs() > 1e-3).all(-1)
    assert torch.equal(occupancy[0, :, 0][clear], inside.float()[clear])


@pytest.mark.skipif(not HAS_IGL, reason="libigl is not installed: only the torch winding number is available")
def test_torch_winding_number_agrees_with_igl():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    queries = np.random.default_rng(0).uniform(-0.5, 0.5, (500, 3))
    exact = winding_numbers_torch(mesh.vertices, mesh.faces, queries, pairs_per_chunk=4096)
    reference = igl.winding_number(np.ascontiguousarray(mesh.vertices), mesh.faces.astype(np.int64), queries)
    np.testing.assert_allclose(exact, reference, atol=1e-9)
    fast = winding_numbers(mesh.vertices, mesh.faces, queries, backend="igl")  # Barnes-Hut: approximate
    np.testing.assert_allclose(fast, exact, atol=5e-3)
    distance = np.linalg.norm(queries, axis=1)
    clear = np.abs(distance - 0.4) > 0.02  # the facets of a level-2 icosphere sag < 0.01 below its sphere
    np.testing.assert_array_equal((exact >= 0.5)[clear], (distance < 0.4)[clear])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_open_box_still_has_a_filled_inside(tmp_path, backend):
    write_mesh(box_without_side(), tmp_path / "open_box.obj")
    source = MeshFolderSource(tmp_path, winding_backend=backend)
    vertices, faces = load_normalized_mesh(source.files[0])
    assert not trimesh.Trimesh(vertices, faces).is_watertight
    half = np.array([0.475, 0.285, 0.19])
    rng = np.random.default_rng(0)
    interior = rng.uniform(-0.9, 0.9, (300, 3)) * half
    exterior = rng.uniform(-0.5, 0.5, (2000, 3))
    exterior = exterior[(np.abs(exterior) > 1.1 * half).any(1)][:300]
    assert (np.abs(winding_numbers(vertices, faces, interior, backend=backend)) >= 0.5).mean() > 0.9
    assert (np.abs(winding_numbers(vertices, faces, exterior, backend=backend)) >= 0.5).mean() < 0.1
    if backend == "auto":
        coords, occupancy = source.points([0], 4000, split="eval")
        deep = (coords[0].abs() < torch.tensor(0.9 * half, dtype=torch.float32)).all(-1)
        assert deep.sum() > 100 and occupancy[0, deep, 0].mean() > 0.9


def test_double_sided_and_inverted_meshes_are_solid(tmp_path):
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    double = trimesh.Trimesh(box.vertices, np.concatenate([box.faces, box.faces[:, ::-1]]), process=False)
    inverted = trimesh.Trimesh(box.vertices, box.faces[:, ::-1], process=False)
    write_mesh(double, tmp_path / "a_double.off")
    write_mesh(inverted, tmp_path / "b_inverted.off")
    coords, occupancy = MeshFolderSource(tmp_path).points([0, 1], 2000, split="eval")
    for row in range(2):
        inside = (coords[row].abs() < 0.475).all(-1).float()
        clear = ((coords[row].abs() - 0.475).abs() > 1e-3).all(-1)
        assert torch.equal(occupancy[row, clear, 0], inside[clear])


def test_mesh_points_deterministic_split_and_near_surface(tmp_path):
    for name, radius in (("a.obj", 1.0), ("b.obj", 3.0)):
        write_mesh(trimesh.creation.icosphere(subdivisions=2, radius=radius), tmp_path / name)
    source = MeshFolderSource(tmp_path)
    both, both_occ = source.points([0, 1], 1000, seed=2)
    second, second_occ = source.points([1], 1000, seed=2)
    assert torch.equal(both[1], second[0]) and torch.equal(both_occ[1], second_occ[0])
    assert coords_in_cube(both)
    evaluation, _ = source.points([0, 1], 1000, split="eval", seed=2)
    assert not torch.allclose(evaluation, both)
    near = lambda c: ((c[0].norm(dim=-1) - 0.475).abs() < 0.03).float().mean().item()  # noqa: E731
    assert near(both) > 0.45 and near(evaluation) < 0.2


def coords_in_cube(coords):
    return bool(coords.min() >= -0.5 and coords.max() <= 0.5)


@needs_data
def test_real_modelnet_chairs_normalise_and_have_an_inside():
    folder = DATA / "meshes" / "modelnet10_chair"
    source = MeshFolderSource(folder)
    assert len(source) == 4 and source.labels.tolist() == [0, 0, 0, 0]
    for path in source.files:
        vertices, faces = load_normalized_mesh(path)
        used = vertices[np.unique(faces)]
        assert abs(np.abs(used).max() - 0.475) < 1e-9
        np.testing.assert_allclose(used.min(0) + used.max(0), 0.0, atol=1e-9)  # bounding box centred
    coords, occupancy = source.points(range(4), 4000, split="eval")
    fractions = occupancy.mean(dim=(1, 2))
    # chair_0890 stores each face twice (both orientations): w = 0 everywhere without the duplicate drop
    assert ((fractions > 0.005) & (fractions < 0.5)).all(), fractions
    assert coords_in_cube(coords)


def test_shapenet_like_tree_gives_labels_and_class_names(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    write_mesh(sphere, tmp_path / "02691156" / "model_b" / "models" / "model_normalized.obj")
    write_mesh(sphere, tmp_path / "02691156" / "model_a" / "models" / "model_normalized.obj")
    write_mesh(sphere, tmp_path / "03001627" / "chair.ply")
    (tmp_path / "03001627" / "notes.txt").write_text("not a mesh")
    source = MeshFolderSource(tmp_path, name="tree")
    assert source.class_names == ["02691156", "03001627"]
    assert source.labels.tolist() == [0, 0, 1]
    assert [p.parent.parent.name for p in source.files[:2]] == ["model_a", "model_b"]
    described = json.loads(json.dumps(source.describe()))
    assert described["kind"] == "occupancy" and described["class_names"] == ["02691156", "03001627"]
    write_mesh(sphere, tmp_path / "flat.off")
    with pytest.raises(ValueError, match="mixes"):
        MeshFolderSource(tmp_path)


def test_bad_mesh_files_raise_naming_the_file(tmp_path):
    write_mesh(trimesh.creation.icosphere(subdivisions=1), tmp_path / "a_good.off")
    (tmp_path / "b_empty.off").write_bytes(b"")
    (tmp_path / "c_garbage.ply").write_bytes(b"\x00\x01 definitely not a mesh")
    (tmp_path / "d_nofaces.obj").write_text("# vertices only\nv 0 0 0\nv 1 0 0\n")
    source = MeshFolderSource(tmp_path)
    assert len(source) == 4
    source.points([0], 100)
    for index, name in ((1, "b_empty.off"), (2, "c_garbage.ply"), (3, "d_nofaces.obj")):
        with pytest.raises(ValueError, match=name):
            source.points([index], 100)


def test_folder_without_meshes_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match=r"no mesh files \(\.obj, \.off, \.ply\)") as error:
        MeshFolderSource(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_cache_round_trip_gives_identical_points(tmp_path, monkeypatch):
    write_mesh(trimesh.creation.icosphere(subdivisions=2), tmp_path / "meshes" / "ball.obj")
    write_mesh(trimesh.creation.box(), tmp_path / "meshes" / "box.off")
    cache = tmp_path / "cache"
    first = MeshFolderSource(tmp_path / "meshes", cache_dir=cache).points([0, 1], 500, seed=1)
    files = sorted(cache.iterdir())
    assert len(files) == 2 and all(f.suffix == ".npz" for f in files)  # no temporary files left behind

    def fail(*args, **kwargs):
        raise AssertionError("winding numbers recomputed despite the cache")

    monkeypatch.setattr(shapes, "winding_numbers", fail)
    second = MeshFolderSource(tmp_path / "meshes", cache_dir=cache).points([0, 1], 500, seed=1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(AssertionError, match="recomputed"):  # another request is another cache entry
        MeshFolderSource(tmp_path / "meshes", cache_dir=cache).points([0], 500, seed=2)
    monkeypatch.undo()
    uncached = MeshFolderSource(tmp_path / "meshes").points([0, 1], 500, seed=1)
    assert torch.equal(first[0], uncached[0]) and torch.equal(first[1], uncached[1])


# ------------------------------------------------------------------------------------------- dispatch
@needs_data
def test_load_shape_source_dispatches_by_path(tmp_path):
    voxels = load_shape_source(DATA / "shapes" / "modelnet10_chair_32.npz", num_shapes=5)
    assert isinstance(voxels, VoxelGridSource) and len(voxels) == 5
    meshes = load_shape_source(DATA / "meshes" / "modelnet10_chair", num_shapes=2)
    assert isinstance(meshes, MeshFolderSource) and len(meshes) == 2
    other = tmp_path / "shapes.txt"
    other.write_text("no")
    with pytest.raises(ValueError, match="shapes.txt"):
        load_shape_source(other)
    with pytest.raises(ValueError, match="does not exist"):
        load_shape_source(tmp_path / "missing.npz")


def test_voxel_centres_are_the_grid_itself():
    grid = sphere_grid(8, 0.3)
    source = VoxelGridSource(grid[None], fill=False)
    coords, occupancy = source.points([0], 123, split="centres")
    assert coords.shape == (1, 512, 3) and occupancy.shape == (1, 512, 1)
    assert torch.equal(occupancy[0, :, 0].bool(), torch.from_numpy(grid.reshape(-1)))
    # the centre of voxel (i, j, k) is ((i, j, k) + 0.5) / 8 - 0.5
    assert torch.allclose(coords[0, 8 * 8 * 2 + 8 * 3 + 5], torch.tensor([2.5, 3.5, 5.5]) / 8 - 0.5)
