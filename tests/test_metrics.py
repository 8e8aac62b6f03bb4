"""Metrics: distances and MMD / COV / 1-NNA against brute-force NumPy references written here with plain loops,
known cases, invariances, Fréchet distances, feature nets, the `evaluate` module and bad input."""

import doctest
import importlib.util
import math

import numpy as np
import pytest
import torch

from nef_transformers.metrics import (
    NEF_GENERATION_METRIC,
    ImageFeatureNet,
    PointNetFeatureNet,
    chamfer_distance_matrix,
    frechet_distance,
    generation_metrics,
    image_distance_matrix,
    load_feature_net,
    memorisation_ratio,
    mmd_cov_1nna,
    normalize_point_clouds,
    train_feature_net,
)


# ------------------------------------------------------------------------------------------- references
def brute_chamfer(x: np.ndarray, y: np.ndarray) -> float:
    """Squared-L2 Chamfer from direct differences (no norm expansion), float64."""
    squared = ((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1)  # (n, m)
    return squared.min(1).mean() + squared.min(0).mean()


def brute_matrix(a, b, distance) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = distance(a[i], b[j])
    return out


def brute_metrics(d_sr, d_ss, d_rr):
    """MMD, COV, 1-NNA with plain loops; 1-NNA ties scored as the share of tied neighbours with the own label."""
    num_s, num_r = d_sr.shape
    mmd = sum(min(d_sr[s, r] for s in range(num_s)) for r in range(num_r)) / num_r
    covered = set()
    for s in range(num_s):
        best = 0
        for r in range(1, num_r):
            if d_sr[s, r] < d_sr[s, best]:
                best = r
        covered.add(best)
    items = [("r", i) for i in range(num_r)] + [("s", i) for i in range(num_s)]

    def dist(p, q):
        if p[0] == q[0]:
            return (d_rr if p[0] == "r" else d_ss)[p[1], q[1]]
        return d_sr[p[1], q[1]] if p[0] == "s" else d_sr[q[1], p[1]]

    score = 0.0
    for p in items:
        others = [q for q in items if q != p]
        nearest = min(dist(p, q) for q in others)
        tied = [q for q in others if dist(p, q) == nearest]
        score += sum(q[0] == p[0] for q in tied) / len(tied)
    return mmd, len(covered) / num_r, score / len(items)


@pytest.fixture
def clouds():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 60, 3)).astype(np.float32), rng.normal(size=(6, 45, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------- distances
@pytest.mark.parametrize("method", ["grid", "kdtree", "dense"])
def test_chamfer_matches_brute_force(clouds, method):
    a, b = clouds  # 60 and 45 points: the sets may differ in cloud size
    expected = brute_matrix(a, b, brute_chamfer)
    got = chamfer_distance_matrix(a, b, method=method, progress=False)
    assert got.shape == (7, 6) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(chamfer_distance_matrix(a, b, method=method, dtype=torch.float64,
                                                       progress=False).numpy(), expected, rtol=1e-12)


def test_chamfer_chunked_equals_unchunked_and_symmetric_equals_rectangular(clouds):
    a, b = clouds
    whole = chamfer_distance_matrix(a, b, method="dense", chunk_elements=10 ** 9, progress=False)
    for chunk in (37, 200, 60 * 45, 3 * 60 * 45 + 5):  # 1 row at a time, 4 rows, 1 pair, 3 pairs per block
        torch.testing.assert_close(chamfer_distance_matrix(a, b, method="dense", chunk_elements=chunk,
                                                           progress=False), whole, rtol=1e-6, atol=1e-7)
    threads = torch.get_num_threads()
    for workers in (2, 3):  # whole units of work per thread give the same numbers, torch's threads restored
        for method, options in (("dense", dict(chunk_elements=200)), ("kdtree", {}), ("grid", {})):
            assert torch.equal(
                chamfer_distance_matrix(a, b, method=method, num_workers=workers, progress=False, **options),
                chamfer_distance_matrix(a, b, method=method, num_workers=1, progress=False, **options))
            assert torch.get_num_threads() == threads
    for method in ("dense", "kdtree", "grid"):
        within = chamfer_distance_matrix(a, method=method, progress=False, dtype=torch.float64)
        assert torch.equal(within, within.T) and torch.all(within.diagonal() == 0)
        torch.testing.assert_close(within, chamfer_distance_matrix(a, a, method=method, progress=False,
                                                                   dtype=torch.float64))
        np.testing.assert_allclose(within.numpy(), brute_matrix(a, a, brute_chamfer), rtol=1e-12, atol=1e-15)
    # k-d trees and grids: the triangle (each pair once) is bit for bit the full matrix
    for method in ("kdtree", "grid"):
        assert torch.equal(chamfer_distance_matrix(a, method=method, progress=False),
                           chamfer_distance_matrix(a, a, method=method, progress=False))


def test_kdtree_equals_dense_on_the_protocols_clouds():
    rng = np.random.default_rng(3)
    a = normalize_point_clouds(rng.normal(size=(5, 2048, 3)).astype(np.float32))
    b = normalize_point_clouds(rng.random(size=(4, 2048, 3)).astype(np.float32))
    torch.testing.assert_close(chamfer_distance_matrix(a, b, method="kdtree", progress=False),
                               chamfer_distance_matrix(a, b, method="dense", progress=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(chamfer_distance_matrix(b, method="kdtree", progress=False),
                               chamfer_distance_matrix(b, method="dense", progress=False), rtol=1e-5, atol=0)


def _grid_cases():
    """(name, a, b) float64 sets that stress the grid search: queries outside the other cloud's box, n != m,
    duplicates, flat, single-point and one-location clouds, far-apart and far-from-origin clouds."""
    rng = np.random.default_rng(11)
    normal = rng.normal(size=(3, 50, 3))
    wide = rng.normal(size=(2, 37, 3)) * [4.0, 0.5, 2.0] + [1.0, -3.0, 0.5]  # mostly outside `normal`'s boxes
    duplicated = np.repeat(rng.normal(size=(2, 10, 3)), 4, axis=1)  # every point 4 times
    flat = rng.normal(size=(2, 40, 3)) * [1.0, 1.0, 0.0]  # zero extent along z
    line = np.zeros((1, 40, 3))
    line[0, :, 1] = rng.normal(size=40)  # zero extent along x and z
    clustered = np.concatenate([rng.normal(size=(1, 30, 3)) * 0.01, rng.normal(size=(1, 30, 3)) * 0.01 + 5.0], 1)
    single = rng.normal(size=(4, 1, 3))
    same = np.full((2, 20, 3), 0.7)  # all points at one location
    return [
        ("outside boxes, n != m", normal, wide),
        ("duplicates", duplicated, normal),
        ("flat", flat, normal[:, :33]),
        ("flat against flat", flat, flat[::-1] * 0.9 + 0.05),
        ("line", line, normal),
        ("two clusters (mostly empty grid)", clustered, normal * 3.0),
        ("single points", single, normal),
        ("single against single", single, single[::-1] + 0.1),
        ("one location", same, normal),
        ("far apart", normal, wide + [1e3, -2e3, 5e2]),
        ("far from the origin", normal + 1e4, wide * 1e-3 + 1e4),
        ("mixed", np.concatenate([normal[:, :40], flat]), wide[:, :11]),
    ]


@pytest.mark.parametrize("name, a, b", _grid_cases(), ids=[case[0] for case in _grid_cases()])
def test_grid_is_exact_on_hard_cases(name, a, b):
    expected = brute_matrix(a, b, brute_chamfer)
    got = chamfer_distance_matrix(a, b, method="grid", dtype=torch.float64, progress=False).numpy()
    # the minima are the brute-force ones (a wrong nearest point would move a mean far more than 1e-12)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    both = np.concatenate([a[:, :min(a.shape[1], b.shape[1])], b[:, :min(a.shape[1], b.shape[1])]])
    within = chamfer_distance_matrix(both, method="grid", dtype=torch.float64, progress=False)
    assert torch.equal(within, within.T) and torch.all(within.diagonal() == 0)
    np.testing.assert_allclose(within.numpy(), brute_matrix(both, both, brute_chamfer), rtol=1e-12, atol=0)


def test_grid_equals_kdtree_on_surfaces_and_auto_picks_it(monkeypatch):
    rng = np.random.default_rng(5)
    spheres = rng.normal(size=(5, 2048, 3))
    spheres /= np.linalg.norm(spheres, axis=-1, keepdims=True)  # points on unit spheres ...
    spheres = spheres * rng.uniform(0.3, 1.5, size=(5, 1, 3)) + rng.normal(size=(5, 1, 3)) * 0.2  # ... stretched
    clouds = normalize_point_clouds(spheres.astype(np.float32))
    a, b = clouds[:3], clouds[3:]
    grid = chamfer_distance_matrix(a, b, method="grid", progress=False)
    kdtree = chamfer_distance_matrix(a, b, method="kdtree", progress=False)
    torch.testing.assert_close(grid, kdtree, rtol=1e-12, atol=0)
    within = chamfer_distance_matrix(clouds, method="grid", progress=False)
    assert torch.equal(within, within.T) and torch.all(within.diagonal() == 0)
    assert torch.all(within + torch.eye(5) > 0)
    torch.testing.assert_close(within, chamfer_distance_matrix(clouds, method="kdtree", progress=False), rtol=1e-12,
                               atol=0)
    assert torch.equal(chamfer_distance_matrix(a, b, progress=False), grid)  # "auto" on the CPU
    from nef_transformers.metrics import distances

    monkeypatch.setattr(distances, "_NUMBA_CHECKED", [False])  # as if numba did not import: k-d trees
    assert torch.equal(chamfer_distance_matrix(a, b, progress=False), kdtree)


def _shape_clouds(count: int, num_points: int, seed: int) -> np.ndarray:
    """Normalised points on stretched, shifted spheres: distances spread like real shapes'."""
    rng = np.random.default_rng(seed)
    spheres = rng.normal(size=(count, num_points, 3))
    spheres /= np.linalg.norm(spheres, axis=-1, keepdims=True)
    spheres = spheres * rng.uniform(0.3, 1.5, size=(count, 1, 3)) + rng.normal(size=(count, 1, 3)) * 0.2
    return normalize_point_clouds(spheres.astype(np.float32)).numpy()


def test_grid_pass_bounds_are_lower_bounds_and_end_exact():
    from nef_transformers.metrics import distances

    clouds = np.ascontiguousarray(_shape_clouds(6, 1024, seed=8).astype(np.float64))
    grids = distances._grids(clouds)
    first, second = distances._all_pairs(len(clouds), None)
    exact = brute_matrix(clouds, clouds, brute_chamfer)[first, second]
    run = lambda limits, stop: distances._grid_run(grids, grids, first, second, limits, stop,  # noqa: E731
                                                   num_workers=1, bar={"disable": True})
    for stop in range(1, distances.GRID_PASSES):  # after every pass: a lower bound that is not trivial
        bound, done = run(np.full(len(first), np.inf), stop)
        assert np.all(done == stop) and np.all(bound <= exact)
        if stop == 1:  # its exact terms alone are ~1/16 of the sum: the Lipschitz bounds of the others add to it
            assert np.mean(bound / exact) > 2.0 / distances.GRID_PASSES
    full, done = run(np.full(len(first), np.inf), distances.GRID_PASSES)
    assert np.all(done == distances.GRID_PASSES)
    np.testing.assert_allclose(full, exact, rtol=1e-12, atol=0)
    limits = np.median(exact) * np.ones(len(first))  # a pair stops once its bound passes the limit
    bound, done = run(limits, distances.GRID_PASSES)
    stopped = done < distances.GRID_PASSES
    assert stopped.any() and np.all(exact[stopped] > limits[stopped]) and np.all(bound[stopped] > limits[stopped])
    assert np.array_equal(bound[~stopped], full[~stopped])  # the same sums whatever the limits


def test_nearest_matrices_give_exactly_the_full_metrics():
    from nef_transformers.metrics import chamfer_nearest_matrices

    refs = _shape_clouds(14, 256, seed=1)
    samples = _shape_clouds(14, 256, seed=2)
    samples[3] = refs[5]  # a copy: a zero distance
    samples[7] = samples[6]  # two identical samples: ties in every row
    refs[9] = refs[8]  # two identical references: COV's argmin ties
    full = (chamfer_distance_matrix(samples, refs, progress=False), chamfer_distance_matrix(samples, progress=False),
            chamfer_distance_matrix(refs, progress=False))
    nearest = chamfer_nearest_matrices(samples, refs, progress=False)
    assert any(bool(torch.isinf(m).any()) for m in nearest)  # pairs were dropped ...
    for kept, whole in zip(nearest, full):
        finite = torch.isfinite(kept)
        assert torch.equal(kept[finite], whole[finite])  # ... and every kept one is the full matrix's, bit for bit
    assert mmd_cov_1nna(*nearest, allow_inf=True) == mmd_cov_1nna(*full)
    union_full = torch.cat([torch.cat([full[2], full[0].T], 1), torch.cat([full[0], full[1]], 1)])
    union = torch.cat([torch.cat([nearest[2], nearest[0].T], 1), torch.cat([nearest[0], nearest[1]], 1)])
    off = ~torch.eye(len(union), dtype=torch.bool)
    for row in range(len(union)):  # every item's nearest others, ties included, are there
        tied = off[row] & (union_full[row] == union_full[row][off[row]].min())
        assert torch.equal(union[row][tied], union_full[row][tied])
    # rows' minima only: rectangular and within one set
    for a, b in ((samples, refs), (refs, None)):
        whole = chamfer_distance_matrix(a, b, progress=False)
        rows = chamfer_distance_matrix(a, b, progress=False, nearest_only=True)
        if b is None:
            whole, rows = whole + torch.diag(torch.full((len(a),), np.inf)), rows + torch.diag(torch.full((len(a),), np.inf))
        assert torch.equal(rows.min(1).values, whole.min(1).values) and torch.isinf(rows).any()
        tied = whole == whole.min(1, keepdim=True).values
        assert torch.equal(rows[tied], whole[tied])
    # generation_metrics uses these: the same numbers as from the full matrices
    train = _shape_clouds(10, 256, seed=3)
    metrics = generation_metrics(samples, refs, modality="points", train_items=train, normalize=False)
    expected = mmd_cov_1nna(*full)
    expected["memorisation_ratio"] = memorisation_ratio(chamfer_distance_matrix(samples, train, progress=False),
                                                        chamfer_distance_matrix(refs, train, progress=False))
    assert metrics == expected


@pytest.mark.parametrize("method", ["grid", "kdtree", "dense"])
def test_identical_clouds_are_exactly_zero_apart(clouds, method):
    a, _ = clouds
    shifted = a + 100.0  # large norms: the expansion's round-off must still snap to 0
    assert torch.all(chamfer_distance_matrix(shifted, shifted, method=method, progress=False).diagonal() == 0)


@pytest.mark.parametrize("method", ["grid", "kdtree"])
def test_duplicates_tie_exactly_across_matrices(clouds, method):
    refs, _ = clouds
    samples = np.concatenate([refs[2:3], refs[:2] + 0.01])  # sample 0 is a copy of reference 2
    d_sr = chamfer_distance_matrix(samples, refs, method=method, progress=False)
    d_ss = chamfer_distance_matrix(samples, method=method, progress=False)
    d_rr = chamfer_distance_matrix(refs, method=method, progress=False)
    assert torch.equal(d_sr[0], d_rr[2]) and d_sr[0, 2] == 0  # S-R and R-R computed apart agree bit for bit
    assert torch.equal(d_ss[0, 1:], d_sr[1:, 2])


def test_normalisation_is_hyperdiffusions_and_makes_chamfer_invariant(clouds):
    a, b = clouds
    a = a + np.array([0.3, -0.2, 0.1], dtype=np.float32)  # off-centre, so the two std conventions differ
    pc = torch.from_numpy(a[0]).double()
    expected = (pc - pc.mean(dim=0).reshape(1, 3)) / pc.flatten().std().reshape(1, 1)  # hyperdiffusion.py
    torch.testing.assert_close(normalize_point_clouds(a[:1]).double()[0], expected)
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.1, 10.0, size=(len(a), 1, 1))
    reference = lambda x, **kw: chamfer_distance_matrix(normalize_point_clouds(x.astype(np.float32), **kw),  # noqa: E731
                                                        normalize_point_clouds(b, **kw), progress=False)
    before = reference(a)
    # HyperDiffusion's std (before centring): invariant to scaling and to translations along (1, 1, 1) ...
    torch.testing.assert_close(reference(a * scales + rng.normal(size=(len(a), 1, 1)) * 5), before, rtol=1e-4,
                               atol=1e-6)
    # ... but not to other translations; the centred std is invariant to every translation and scaling.
    moved = a * scales + rng.normal(size=(len(a), 1, 3)) * 5
    assert not torch.allclose(reference(moved), before, rtol=1e-2)
    torch.testing.assert_close(reference(moved, centered_std=True), reference(a, centered_std=True), rtol=1e-4,
                               atol=1e-6)


def test_image_distances_match_brute_force():
    rng = np.random.default_rng(2)
    a, b = rng.random((5, 6, 7, 3)), rng.random((4, 6, 7, 3))
    expected = brute_matrix(a, b, lambda x, y: float(((x - y) ** 2).mean()))
    np.testing.assert_allclose(image_distance_matrix(a, b, progress=False).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(image_distance_matrix(a, b, chunk_size=2, progress=False).numpy(), expected, rtol=1e-12)
    within = image_distance_matrix(a, progress=False)
    assert torch.all(within.diagonal() == 0)
    grey = (rng.random((3, 6, 7)) * 255).astype(np.uint8)  # uint8 is scaled to [0, 1], a missing C axis added
    np.testing.assert_allclose(image_distance_matrix(grey, progress=False).numpy(),
                               brute_matrix(grey / 255.0, grey / 255.0, lambda x, y: float(((x - y) ** 2).mean())),
                               atol=1e-15)


# ------------------------------------------------------------------------------------------- MMD, COV, 1-NNA
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmd_cov_1nna_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    samples, refs = rng.normal(size=(9, 4)), rng.normal(size=(9, 4)) + 0.3
    d = lambda x, y: float(((x - y) ** 2).sum())  # noqa: E731
    d_sr, d_ss, d_rr = brute_matrix(samples, refs, d), brute_matrix(samples, samples, d), brute_matrix(refs, refs, d)
    got = mmd_cov_1nna(d_sr, d_ss, d_rr)
    mmd, cov, one_nna = brute_metrics(d_sr, d_ss, d_rr)
    assert got["mmd"] == pytest.approx(mmd, rel=1e-12)
    assert got["cov"] == cov
    assert got["one_nna"] == pytest.approx(one_nna, abs=1e-12)
    assert got["one_nna"] == pytest.approx((got["one_nna_samples"] + got["one_nna_references"]) / 2)


def test_ties_share_the_credit_and_ignore_order():
    x, y = np.zeros((4, 4, 1)), np.ones((4, 4, 1))
    items = np.stack([x, x, y, y])  # duplicates in both sets: every item has 3 nearest at distance 0
    d = image_distance_matrix(items, progress=False).numpy()
    result = mmd_cov_1nna(d, d, d)
    assert result["one_nna"] == pytest.approx(1 / 3) == pytest.approx(brute_metrics(d, d, d)[2])
    assert result["cov"] == 0.5  # ties in COV go to the first reference: x covers index 0, y index 2
    order = np.array([2, 0, 3, 1])
    shuffled = mmd_cov_1nna(d[order], d[np.ix_(order, order)], d)
    assert shuffled["one_nna"] == result["one_nna"] and shuffled["mmd"] == result["mmd"]


def test_identical_sets_are_copies():
    rng = np.random.default_rng(4)
    images = rng.random((10, 8, 8))
    assert generation_metrics(images, images) == {"mmd": 0.0, "cov": 1.0, "one_nna": 0.0, "one_nna_samples": 0.0,
                                                  "one_nna_references": 0.0}
    clouds = rng.normal(size=(6, 50, 3))
    result = generation_metrics(clouds, clouds, modality="points")
    assert (result["mmd"], result["cov"], result["one_nna"]) == (0.0, 1.0, 0.0)


def test_far_apart_sets():
    rng = np.random.default_rng(5)
    refs = rng.random((12, 8, 8, 1))
    dark = rng.random((12, 8, 8, 1)) * 1e-3
    result = generation_metrics(dark, refs)
    assert result["one_nna"] == 1.0
    assert result["cov"] == 1 / 12  # every dark sample's nearest real image is the darkest one
    blobs = rng.normal(size=(8, 128, 3))
    plates = rng.normal(size=(8, 128, 3)) * [1.0, 1.0, 1e-3]
    result = generation_metrics(plates, blobs, modality="points")
    assert result["one_nna"] == 1.0 and result["mmd"] > 0.1


def test_memorisation_ratio():
    rng = np.random.default_rng(6)
    train, heldout = rng.normal(size=(30, 5)), rng.normal(size=(10, 5))
    copies = train[:10] + 1e-3 * rng.normal(size=(10, 5))
    d = lambda x, y: float(((x - y) ** 2).sum())  # noqa: E731
    heldout_to_train = brute_matrix(heldout, train, d)
    assert memorisation_ratio(heldout_to_train, heldout_to_train) == 1.0
    assert memorisation_ratio(brute_matrix(copies, train, d), heldout_to_train) < 0.01
    expected = np.median(brute_matrix(copies, train, d).min(1)) / np.median(heldout_to_train.min(1))
    assert memorisation_ratio(brute_matrix(copies, train, d), heldout_to_train) == pytest.approx(expected)
    result = generation_metrics(copies.reshape(10, 5, 1, 1).clip(0, 1), heldout.reshape(10, 5, 1, 1).clip(0, 1),
                                train_items=train.reshape(30, 5, 1, 1).clip(0, 1))
    assert 0 <= result["memorisation_ratio"] < 1


# ------------------------------------------------------------------------------------------- Fréchet
def test_frechet_distance_analytic_cases():
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    shift = rng.normal(size=6)
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Independent samples of N(0, I) and N(0, 4I) in d = 3: analytic 3 * (1 + 4 - 2 * 2) = 3.
    wide = rng.normal(size=(200000, 3))
    assert frechet_distance(wide[:100000], 2 * wide[100000:]) == pytest.approx(3.0, rel=0.02)


# ------------------------------------------------------------------------------------------- feature nets
def test_mnist_cnn_trains_saves_and_loads(tmp_path):
    from nef_transformers.data import load_mnist

    source = load_mnist()
    order = np.random.default_rng(0).permutation(len(source))
    train, test = order[:2000], order[4000:]  # a quick run: 2,000 digits x 4 epochs (defaults: 4,000 x 5, ~96%)
    net = ImageFeatureNet()
    history = train_feature_net(net, source.images[train], source.labels[train], epochs=4, seed=0, progress=False)
    assert history.losses[-1] < history.losses[0]
    probs = net.predict_proba(source.images[test])
    assert probs.shape == (1000, 10) and np.allclose(probs.sum(1), 1)
    accuracy = float((probs.argmax(1) == source.labels[test]).mean())
    assert accuracy >= 0.90, accuracy
    net.save(tmp_path / "cnn", metadata={"held_out_accuracy": accuracy})
    loaded = load_feature_net(tmp_path / "cnn" / "model.safetensors")
    assert isinstance(loaded, ImageFeatureNet) and loaded.config == net.config
    images = source.images[test[:64]]
    features = net.features(images)
    assert features.shape == (64, 64) and features.dtype == np.float64
    assert np.array_equal(loaded.features(images), features)
    assert np.array_equal(ImageFeatureNet.load(tmp_path / "cnn").predict_proba(images), probs[:64])
    assert not list(tmp_path.glob("cnn/*.bin")) and not list(tmp_path.glob("cnn/*.pt"))  # safetensors only


def _chair_vs_primitive_clouds(shared_data, num_per_class: int, num_points: int):
    """Chairs (points on the voxel shells of ModelNet10 chairs) vs boxes vs ellipsoids, labels 0 / 1 / 2."""
    import trimesh

    from nef_transformers.fields import sample_point_cloud

    rng = np.random.default_rng(0)
    shells = np.load(shared_data / "shapes" / "modelnet10_chair_32.npz")["voxels"][:num_per_class]
    chairs = []
    for grid in shells:
        cells = np.argwhere(grid)
        picked = cells[rng.integers(len(cells), size=num_points)]
        chairs.append((picked + rng.random(picked.shape)) / grid.shape[0] - 0.5)
    boxes = [sample_point_cloud(trimesh.creation.box(extents=rng.uniform(0.3, 1.0, 3)), num_points, seed=i)
             for i in range(num_per_class)]
    ellipsoids = []
    for i in range(num_per_class):
        sphere = trimesh.creation.icosphere(subdivisions=2)
        sphere.apply_scale(rng.uniform(0.3, 1.0, 3))
        ellipsoids.append(sample_point_cloud(sphere, num_points, seed=i))
    clouds = np.concatenate([np.stack(chairs), np.stack(boxes), np.stack(ellipsoids)]).astype(np.float32)
    return clouds, np.repeat(np.arange(3), num_per_class)


def test_pointnet_trains_on_chairs_saves_and_loads(shared_data, tmp_path):
    clouds, labels = _chair_vs_primitive_clouds(shared_data, num_per_class=40, num_points=256)
    order = np.random.default_rng(1).permutation(len(clouds))
    train, test = order[:90], order[90:]
    net = PointNetFeatureNet(num_classes=3, widths=(32, 64), feature_dim=64)
    train_feature_net(net, clouds[train], labels[train], epochs=15, batch_size=16, lr=3e-3, progress=False)
    accuracy = float((net.predict_proba(clouds[test]).argmax(1) == labels[test]).mean())
    assert accuracy >= 0.9, accuracy
    net.save(tmp_path / "pointnet")
    loaded = load_feature_net(tmp_path / "pointnet")
    assert isinstance(loaded, PointNetFeatureNet)
    assert np.array_equal(loaded.features(clouds[test]), net.features(clouds[test]))
    # features see shape, not position or scale (clouds are normalised inside)
    np.testing.assert_allclose(net.features(clouds[test] * 3.0 + 1.0), net.features(clouds[test]), atol=1e-4)
    fd = generation_metrics(clouds[:40], clouds[40:80], modality="points", feature_net=tmp_path / "pointnet")["fd"]
    assert fd > generation_metrics(clouds[:20], clouds[20:40], modality="points", feature_net=loaded)["fd"]


# ------------------------------------------------------------------------------------------- evaluate module
def _load_module_file():
    path = NEF_GENERATION_METRIC / "nef_generation.py"
    spec = importlib.util.spec_from_file_location("nef_generation_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_module_equals_plain_functions_and_its_doctests_pass(tmp_path):
    import evaluate

    metric = evaluate.load(str(NEF_GENERATION_METRIC))
    rng = np.random.default_rng(8)
    samples, refs = rng.random((10, 8, 8, 1)), rng.random((10, 8, 8, 1))
    assert metric.compute(predictions=samples, references=refs) == generation_metrics(samples, refs)
    digits_a = (rng.random((10, 8, 8)) * 255).astype(np.uint8)
    digits_b = (rng.random((10, 8, 8)) * 255).astype(np.uint8)
    assert metric.compute(predictions=digits_a, references=digits_b) == generation_metrics(digits_a, digits_b)
    clouds_s, clouds_r = rng.normal(size=(6, 40, 3)), rng.normal(size=(6, 40, 3))
    assert (metric.compute(predictions=clouds_s, references=clouds_r, modality="points")
            == generation_metrics(clouds_s, clouds_r, modality="points"))
    net = ImageFeatureNet(image_shape=(8, 8, 1), channels=(4, 8), feature_dim=8)
    net.save(tmp_path / "net")
    with_fd = metric.compute(predictions=samples, references=refs, feature_net_path=str(tmp_path / "net"))
    assert with_fd["fd"] == generation_metrics(samples, refs, feature_net=net)["fd"]
    with pytest.raises(ValueError, match="modality"):
        metric.compute(predictions=samples, references=refs, modality="voxels")

    module = _load_module_file()
    tests = doctest.DocTestFinder().find(module.NefGeneration, "NefGeneration", globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert sum(len(test.examples) for test in tests) >= 10


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: chamfer_distance_matrix(np.zeros((0, 5, 3))), "clouds_a is empty"),
        (lambda: chamfer_distance_matrix([]), "clouds_a is empty"),
        (lambda: chamfer_distance_matrix([np.zeros((5, 3)), np.zeros((5, 3)), np.zeros((4, 3))]),
         r"ragged: clouds_a\[2\] has 4 points"),
        (lambda: chamfer_distance_matrix([np.zeros((5, 3)), None]), r"clouds_a\[1\] is None"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 2))), r"shape \(b, n, 3\)"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), np.r_[np.zeros((1, 5, 3)), np.full((1, 5, 3), np.nan)]),
         r"clouds_b\[1\] contains NaN"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), method="dense", chunk_elements=0), "chunk_elements"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), chunk_elements=64), "method='dense' only"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), method="brute"), "method must be one of"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), method="kdtree", device="cuda"), "runs on the CPU"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), method="grid", device="cuda"), "runs on the CPU"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), method="grid", chunk_elements=64), "'dense' only"),
        (lambda: chamfer_distance_matrix(np.zeros((2, 5, 3)), num_workers=0), "num_workers"),
        (lambda: normalize_point_clouds(np.concatenate([np.eye(5, 3)[None], np.ones((2, 5, 3))])),
         r"point clouds\[1\] has all its points at one location"),
        (lambda: image_distance_matrix(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), "mismatched image shapes"),
        (lambda: image_distance_matrix(np.full((2, 4, 4), 255.0)), r"images_a\[0\] has values outside \[0, 1\]"),
        (lambda: image_distance_matrix([np.zeros((4, 4)), np.zeros((4, 4)) + np.nan]), r"images_a\[1\] contains NaN"),
        (lambda: image_distance_matrix([np.zeros((4, 4)), np.zeros((5, 4))]), r"ragged: images_a\[1\]"),
        (lambda: image_distance_matrix(np.zeros((0, 4, 4))), "images_a is empty"),
        (lambda: generation_metrics(np.zeros((3, 4, 4)), np.zeros((4, 4, 4))), "as many samples as references"),
        (lambda: generation_metrics(np.zeros((3, 4, 4)), np.zeros((3, 4, 4)), modality="voxels"), "modality"),
        (lambda: mmd_cov_1nna(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3))), "as many samples"),
        (lambda: mmd_cov_1nna(np.zeros((2, 2)), np.zeros((3, 3)), np.zeros((2, 2))), r"dist_ss must be \(2, 2\)"),
        (lambda: mmd_cov_1nna(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((1, 1))), r"dist_rr must be \(2, 2\)"),
        (lambda: mmd_cov_1nna(np.array([[0, np.nan], [1, 0]]), np.zeros((2, 2)), np.zeros((2, 2))), r"dist_sr\[0, 1\]"),
        (lambda: mmd_cov_1nna(np.array([[0, -1.0], [1, 0]]), np.zeros((2, 2)), np.zeros((2, 2))), "negative"),
        (lambda: mmd_cov_1nna(np.array([[0, np.inf], [1, 0]]), np.zeros((2, 2)), np.zeros((2, 2))), "finite"),
        (lambda: mmd_cov_1nna(np.array([[0, np.nan], [1, 0]]), np.zeros((2, 2)), np.zeros((2, 2)), allow_inf=True),
         r"dist_sr\[0, 1\] is nan"),
        (lambda: mmd_cov_1nna(np.array([[np.inf, np.inf], [1, 0]]), np.zeros((2, 2)), np.zeros((2, 2)), allow_inf=True),
         "no finite distance"),
        (lambda: mmd_cov_1nna(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((0, 0))), "empty"),
        (lambda: memorisation_ratio(np.ones((2, 3)), np.zeros((2, 3))), "overlaps the training set"),
        (lambda: memorisation_ratio(np.ones((2, 3)), np.ones((2, 4))), "same training items"),
        (lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))), "feature dimensions differ"),
        (lambda: frechet_distance(np.zeros((1, 3)), np.zeros((5, 3))), "at least 2"),
        (lambda: frechet_distance(np.zeros((3, 3)) + [[0], [0], [np.nan]], np.zeros((5, 3))), r"feats_a\[2\]"),
        (lambda: ImageFeatureNet().features(np.zeros((2, 32, 32, 3))), r"built for images of shape \(28, 28, 1\)"),
        (lambda: train_feature_net(ImageFeatureNet(), np.zeros((2, 28, 28)), [0, 10]), r"0\.\.9"),
        (lambda: train_feature_net(ImageFeatureNet(), np.zeros((2, 28, 28)), [0.5, 1.0]), "integers"),
        (lambda: load_feature_net("/nonexistent/net"), "no feature net"),
        (lambda: ImageFeatureNet(channels=(8,)), "2 values"),
    ],
)
def test_bad_input_raises_clearly(call, message):
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=message):
        call()


def test_unequal_sets_allowed_on_request():
    rng = np.random.default_rng(9)
    result = generation_metrics(rng.random((3, 4, 4)), rng.random((5, 4, 4)), allow_unequal=True)
    assert 0 <= result["cov"] <= 3 / 5 and math.isfinite(result["one_nna"])


def test_loading_the_wrong_architecture_is_refused(tmp_path):
    PointNetFeatureNet(widths=(8,), feature_dim=4).save(tmp_path / "p")
    with pytest.raises(ValueError, match="holds a PointNetFeatureNet, not a ImageFeatureNet"):
        ImageFeatureNet.load(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text('{"architecture": "Unknown", "config": {}}')
    with pytest.raises(ValueError, match="unknown architecture"):
        load_feature_net(tmp_path / "p")
