"""Speed of the generation metric on point clouds: the S-R, S-S and R-R Chamfer matrices and MMD / COV / 1-NNA.

    python benchmarks/metric_speed.py                         # the target: 1,000 x 1,000 clouds of 2,048 points
    python benchmarks/metric_speed.py --num-clouds 200        # shorter, extrapolated to 1,000
    python benchmarks/metric_speed.py --num-clouds 200 --surface   # clouds sampled on surfaces instead
    python benchmarks/metric_speed.py --num-clouds 400 --clouds-file chairs.npy   # real clouds (c, n, 3), shuffled

ISSUE 5's target: 1,000 samples x 1,000 references of 2,048 points each in under 10 minutes on 2 CPU cores.
Clouds are random (Gaussian blobs, or with ``--surface`` points on random ellipsoids and tori, rotated and
shifted: the metric's real inputs are surface samples, where nearest points of two different shapes lie farther
apart) and normalised per cloud like the package does (`normalize_point_clouds`). Two parts, in one run:

1. Old against new: on the first ``--compare-clouds`` samples x references (S-R only), the new method
   (``--method``, default ``auto``: the numba grid on the CPU) and the old one (``--old-method``, default
   ``kdtree`` against the grid, ``dense`` tiles otherwise) are timed in the order new, old, new, so that a change
   of machine load hits both; the speed-up is old / mean(new). The two matrices must agree (their largest
   relative difference is printed). The new method is run once on 2 x 2 clouds first, so that compiling (numba)
   is not timed.
2. The metric with the new method on N = ``--num-clouds``: S-R holds N² pairs, S-S and R-R N(N-1)/2 each
   (symmetric: each pair once), MMD / COV / 1-NNA are O(N²) on the matrices. By default the matrices come from
   `chamfer_nearest_matrices`, as `generation_metrics` computes them: only the pairs that can be a minimum the
   metrics read are finished, the others dropped after a bound (exact metrics; one timed row). ``--full`` times
   the three full matrices instead. With fewer clouds than ``--target-clouds`` (N') the times are scaled by the
   pair counts (formula printed) and labelled "extrapolated"; for the nearest-only search that overestimates (a
   larger set has nearer neighbours, so more pairs are dropped early). With the grid and part 1, the full
   matrices' time at N' is estimated from part 1's ms per pair, and the nearest-only search's speed-up over it
   printed.

The load average is printed too: on a shared machine other jobs slow every number down, so the CPU time of
this process is reported beside the wall time, and "idle cores" = CPU time / threads (what the same work takes
when the threads get whole cores; the Chamfer workers share no barrier, so it splits evenly). ``--threads`` sets
the Chamfer workers (`chamfer_distance_matrix(num_workers=...)`).

Prints a table, then one JSON line ``{"bench": "metric_speed", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def surface_clouds(count: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, points, 3)`` float32 points on random surfaces: half ellipsoids (axes 0.3..1.5), half tori (radii
    0.6..1.0 and 0.1..0.4), each randomly rotated and shifted by ~0.2 (not area-uniform: enough for timing)."""
    kind = rng.random(count) < 0.5  # True: ellipsoid
    directions = rng.normal(size=(count, points, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    ellipsoids = directions * rng.uniform(0.3, 1.5, size=(count, 1, 3))
    major, minor = rng.uniform(0.6, 1.0, size=(count, 1)), rng.uniform(0.1, 0.4, size=(count, 1))
    theta, phi = rng.uniform(0, 2 * np.pi, size=(2, count, points))
    ring = major + minor * np.cos(phi)
    tori = np.stack([ring * np.cos(theta), ring * np.sin(theta), minor * np.sin(phi)], axis=-1)
    clouds = np.where(kind[:, None, None], ellipsoids, tori)
    rotations, _ = np.linalg.qr(rng.normal(size=(count, 3, 3)))
    clouds = clouds @ rotations + rng.normal(size=(count, 1, 3)) * 0.2
    return clouds.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clouds", type=int, default=1000, help="samples and references each (N)")
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--target-clouds", type=int, default=1000, help="N' to extrapolate to")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--method", choices=("auto", "grid", "kdtree", "dense"), default="auto", help="the new method")
    parser.add_argument("--old-method", choices=("grid", "kdtree", "dense"), default=None,
                        help="the method to compare with (default: kdtree against grid, dense otherwise)")
    parser.add_argument("--compare-clouds", type=int, default=50,
                        help="samples x references on which new and old are timed against each other; 0: skip")
    parser.add_argument("--surface", action="store_true",
                        help="clouds sampled on random ellipsoids and tori instead of Gaussian blobs")
    parser.add_argument("--clouds-file", default=None,
                        help="a .npy of real clouds (c, n, 3): N samples and N references drawn from it (seeded)")
    parser.add_argument("--full", action="store_true",
                        help="time the full S-R, S-S, R-R matrices instead of the nearest-only search")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="point pairs per tile of the dense method (default: per device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_clouds < 2 or args.num_points < 1 or args.threads < 1 or args.compare_clouds < 0:
        parser.error("--num-clouds must be >= 2, --num-points and --threads >= 1, --compare-clouds >= 0")
    torch.set_num_threads(args.threads)

    from nef_transformers.metrics import (chamfer_distance_matrix, chamfer_nearest_matrices, mmd_cov_1nna,
                                          normalize_point_clouds)

    shape = (args.num_clouds, args.num_points, 3)
    if args.clouds_file:
        pool = np.load(args.clouds_file, allow_pickle=False)
        if pool.ndim != 3 or pool.shape[2] != 3 or len(pool) < 2 * args.num_clouds:
            parser.error(f"--clouds-file needs (c, n, 3) with c >= 2 N = {2 * args.num_clouds}, got {pool.shape}")
        pool = pool[np.random.default_rng(args.seed).permutation(len(pool))[:2 * args.num_clouds]]
        samples = normalize_point_clouds(pool[:args.num_clouds])
        references = normalize_point_clouds(pool[args.num_clouds:])
        args.num_points = pool.shape[1]
    elif args.surface:
        rng = np.random.default_rng(args.seed)
        samples = normalize_point_clouds(surface_clouds(args.num_clouds, args.num_points, rng))
        references = normalize_point_clouds(surface_clouds(args.num_clouds, args.num_points, rng))
    else:
        generator = torch.Generator().manual_seed(args.seed)
        samples = normalize_point_clouds(torch.randn(shape, generator=generator))
        references = normalize_point_clouds(torch.randn(shape, generator=generator))
    common = dict(device=args.device, dtype=getattr(torch, args.dtype), num_workers=args.threads)
    method = args.method  # the new method, as chamfer_distance_matrix resolves "auto"
    if method == "auto":
        from nef_transformers.metrics.distances import _chamfer_settings

        method = _chamfer_settings(method, args.device, torch.float32, 1)[0]
    old_method = args.old_method or ("kdtree" if method == "grid" else "dense")
    new, old_options = ({"method": name, "chunk_elements": args.chunk_elements if name == "dense" else None}
                         for name in (method, old_method))
    chamfer_distance_matrix(samples[:2], references[:2], **common, **new, progress=False)  # compile (numba) untimed
    load_before = os.getloadavg()[0]

    def timed(function, *inputs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*inputs)
        return result, time.perf_counter() - wall, time.process_time() - cpu

    # 1. old against new on the same pairs, in the order new, old, new
    k = min(args.compare_clouds, args.num_clouds)
    comparison = None
    if k:
        sub_s, sub_r = samples[:k], references[:k]
        new_1, new_seconds_1, _ = timed(lambda: chamfer_distance_matrix(sub_s, sub_r, **common, **new))
        old, old_seconds, _ = timed(lambda: chamfer_distance_matrix(sub_s, sub_r, **common, **old_options))
        _, new_seconds_2, _ = timed(lambda: chamfer_distance_matrix(sub_s, sub_r, **common, **new))
        new_seconds = (new_seconds_1 + new_seconds_2) / 2
        comparison = dict(pairs=k * k, old_ms=1e3 * old_seconds / k ** 2, new_ms=1e3 * new_seconds / k ** 2,
                          speedup=old_seconds / new_seconds,
                          max_rel_diff=float(((new_1 - old).abs() / old.clamp_min(1e-30)).max()))

    # 2. the metric with the new method
    n, target = args.num_clouds, args.target_clouds
    rows = []  # (name, pairs measured, wall seconds, pairs at the target size, CPU seconds of this process)
    half, target_half = n * (n - 1) // 2, target * (target - 1) // 2
    chamfer = lambda *clouds: chamfer_distance_matrix(*clouds, **common, **new)  # noqa: E731
    distances = {}
    if args.full:
        for name, pairs, target_pairs, clouds in (("S-R", n * n, target * target, (samples, references)),
                                                  ("S-S", half, target_half, (samples,)),
                                                  ("R-R", half, target_half, (references,))):
            distances[name], wall, cpu = timed(chamfer, *clouds)
            rows.append((name, pairs, wall, target_pairs, cpu))
    else:  # as generation_metrics does it
        nearest = lambda: chamfer_nearest_matrices(samples, references, **common, method=method)  # noqa: E731
        (distances["S-R"], distances["S-S"], distances["R-R"]), wall, cpu = timed(nearest)
        rows.append(("S-R+S-S+R-R", n * n + 2 * half, wall, target * target + 2 * target_half, cpu))
    metrics, wall, cpu = timed(lambda: mmd_cov_1nna(distances["S-R"], distances["S-S"], distances["R-R"],
                                                    allow_inf=not args.full))
    rows.append(("MMD/COV/1-NNA", (2 * n) ** 2, wall, (2 * target) ** 2, cpu))
    chamfer_rows = rows[:-1]
    computed = sum(int(torch.isfinite(d).sum()) for d in (distances["S-R"], distances["S-S"], distances["R-R"]))
    computed_share = (computed - 2 * n) / (n * n + 2 * n * (n - 1))  # off-diagonal entries, S-R and both triangles

    extrapolated = n != target
    measured_total = sum(row[2] for row in rows)
    target_total = sum(seconds * target_pairs / pairs for _, pairs, seconds, target_pairs, _ in rows)
    # What `threads` idle cores would take: this process's CPU time spread over them (other jobs' share removed).
    target_idle = sum(cpu * target_pairs / pairs for _, pairs, _, target_pairs, cpu in rows) / args.threads
    chamfer_pairs = sum(row[1] for row in chamfer_rows)
    ms_per_pair = 1e3 * sum(row[2] for row in chamfer_rows) / chamfer_pairs
    target_chamfer = sum(seconds * target_pairs / pairs for _, pairs, seconds, target_pairs, _ in chamfer_rows)
    label = f"at N' = {target}" + (" (extrapolated)" if extrapolated else "")

    clouds_kind = "file" if args.clouds_file else ("surface" if args.surface else "Gaussian")
    print(f"\nChamfer metric speed: N = {n} samples and references, {args.num_points} points, {args.device}, "
          f"{args.threads} threads, {args.dtype}, method {method}, {clouds_kind} clouds, "
          f"{'full matrices' if args.full else 'nearest-only search'}; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    if comparison:
        print(f"old ({old_method}) against new ({method}) on the same {k} x {k} S-R pairs: "
              f"{comparison['old_ms']:.3f} ms/pair old, {comparison['new_ms']:.3f} ms/pair new -> "
              f"{comparison['speedup']:.2f}x; largest relative difference {comparison['max_rel_diff']:.1e}")
    print(f"{'part':<15} {'pairs':>10} {'wall s':>9} {'CPU s':>9} {'wall ms/pair':>13} {'pairs ' + label:>34} "
          f"{'wall s ' + label:>35}")
    for name, pairs, seconds, target_pairs, cpu in rows:
        print(f"{name:<15} {pairs:>10,} {seconds:>9.2f} {cpu:>9.2f} {1e3 * seconds / pairs:>13.3f} {target_pairs:>34,} "
              f"{seconds * target_pairs / pairs:>35.1f}")
    print(f"{'total':<15} {'':>10} {measured_total:>9.2f} {sum(row[4] for row in rows):>9.2f} {'':>13} {'':>34} "
          f"{target_total:>35.1f}")
    if extrapolated:
        print(f"extrapolation: T(N') = t_SR * N'^2/N^2 + (t_SS + t_RR) * N'(N'-1)/(N(N-1)) + t_metrics * N'^2/N^2 "
              f"with N = {n}, N' = {target}: factors {target ** 2 / n ** 2:.1f} and {target_half / half:.1f}")
    verdict = "meets" if target_total < 600 else "misses"
    print(f"new {label}: {target_total / 60:.1f} min on this machine as loaded -> {verdict} the 10-minute target; "
          f"{target_idle / 60:.1f} min on {args.threads} idle cores (CPU time / {args.threads})")
    target_old = target_full = None
    if not args.full:
        print(f"nearest-only search: {100 * computed_share:.2f} % of the pairs finished, the others dropped")
    if comparison:
        if args.full:
            target_old = target_chamfer * comparison["speedup"] + (target_total - target_chamfer)
            print(f"old ({old_method}) {label}: ~{target_old / 60:.1f} min (the new Chamfer time x the measured "
                  f"speed-up)")
        else:  # the full matrices at N' from part 1's ms per pair (same method, every pair)
            target_full = comparison["new_ms"] / 1e3 * (target * target + 2 * target_half)
            print(f"full matrices ({method}) {label}: ~{target_full / 60:.1f} min from part 1's "
                  f"{comparison['new_ms']:.3f} ms/pair -> the nearest-only search is "
                  f"{target_full / target_chamfer:.1f}x faster")
    print(f"(metrics on random clouds: MMD {metrics['mmd']:.4f}, COV {metrics['cov']:.3f}, "
          f"1-NNA {metrics['one_nna']:.3f})")
    print(json.dumps({
        "bench": "metric_speed",
        "num_clouds": n,
        "num_points": args.num_points,
        "device": args.device,
        "threads": args.threads,
        "dtype": args.dtype,
        "method": method,
        "old_method": old_method if comparison else None,
        "clouds": clouds_kind.lower(),
        "nearest_only": not args.full,
        "computed_share": None if args.full else round(computed_share, 5),
        "compare_clouds": k,
        "compare_ms_per_pair_old": None if not comparison else round(comparison["old_ms"], 4),
        "compare_ms_per_pair_new": None if not comparison else round(comparison["new_ms"], 4),
        "speedup": None if not comparison else round(comparison["speedup"], 3),
        "max_rel_diff_old_new": None if not comparison else comparison["max_rel_diff"],
        "seconds_sr": round(rows[0][2], 3) if args.full else None,
        "seconds_ss": round(rows[1][2], 3) if args.full else None,
        "seconds_rr": round(rows[2][2], 3) if args.full else None,
        "seconds_chamfer": round(sum(row[2] for row in chamfer_rows), 3),
        "seconds_metrics": round(rows[-1][2], 3),
        "seconds_total": round(measured_total, 3),
        "cpu_seconds_total": round(sum(row[4] for row in rows), 3),
        "ms_per_pair": round(ms_per_pair, 4),
        "target_clouds": target,
        "target_seconds_total": round(target_total, 1),
        "target_seconds_idle_cores": round(target_idle, 1),
        "target_seconds_old_estimate": None if target_old is None else round(target_old, 1),
        "target_seconds_full_estimate": None if target_full is None else round(target_full, 1),
        "extrapolated": extrapolated,
        "meets_10_min_target": bool(target_total < 600),
        "load_average": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
