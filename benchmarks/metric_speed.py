"""Speed of the generation metric on point clouds: the S-R, S-S and R-R Chamfer matrices and MMD / COV / 1-NNA.

    python benchmarks/metric_speed.py                         # the target: 1,000 x 1,000 clouds of 2,048 points
    python benchmarks/metric_speed.py --num-clouds 100        # a quick check, extrapolated to 1,000

ISSUE 5's target: 1,000 samples x 1,000 references of 2,048 points each in under 10 minutes on 2 CPU cores.
Clouds are random (Gaussian) and normalised per cloud; the brute-force Chamfer cost does not depend on their
content. S-R holds N² pairs, S-S and R-R N(N-1)/2 each (symmetric: the upper triangle only), so with fewer
clouds than ``--target-clouds`` the times are scaled by the pair counts and labelled "extrapolated". The load
average is printed too: on a shared machine other jobs slow every number down, so the CPU time of this process
is reported beside the wall time, and "idle cores" = CPU time / threads (what the same work takes when the
threads get whole cores; the Chamfer workers share no barrier, so it splits evenly). ``--threads`` sets the
Chamfer workers (`chamfer_distance_matrix(num_workers=...)`).

Prints a table, then one JSON line ``{"bench": "metric_speed", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clouds", type=int, default=1000, help="samples and references each (N)")
    parser.add_argument("--num-points", type=int, default=2048)
    parser.add_argument("--target-clouds", type=int, default=1000, help="N to extrapolate to")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--chunk-elements", type=int, default=None, help="point pairs per tile (default: per device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_clouds < 2 or args.num_points < 1 or args.threads < 1:
        parser.error("--num-clouds must be >= 2, --num-points and --threads >= 1")
    torch.set_num_threads(args.threads)

    from nef_transformers.metrics import chamfer_distance_matrix, mmd_cov_1nna, normalize_point_clouds

    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.num_clouds, args.num_points, 3)
    samples = normalize_point_clouds(torch.randn(shape, generator=generator))
    references = normalize_point_clouds(torch.randn(shape, generator=generator))
    options = dict(device=args.device, dtype=getattr(torch, args.dtype), chunk_elements=args.chunk_elements)
    load_before = os.getloadavg()[0]

    n, target = args.num_clouds, args.target_clouds
    rows = []  # (name, pairs measured, wall seconds, pairs at the target size, CPU seconds of this process)

    def timed(name, pairs, target_pairs, function, *inputs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*inputs)
        rows.append((name, pairs, time.perf_counter() - wall, target_pairs, time.process_time() - cpu))
        return result

    half, target_half = n * (n - 1) // 2, target * (target - 1) // 2
    chamfer = lambda *clouds: chamfer_distance_matrix(*clouds, **options)  # noqa: E731
    dist_sr = timed("S-R", n * n, target * target, chamfer, samples, references)
    dist_ss = timed("S-S", half, target_half, chamfer, samples)
    dist_rr = timed("R-R", half, target_half, chamfer, references)
    # MMD / COV / 1-NNA are O(N²) on the matrices: scaled by the entries of the union matrix.
    metrics = timed("MMD/COV/1-NNA", (2 * n) ** 2, (2 * target) ** 2, mmd_cov_1nna, dist_sr, dist_ss, dist_rr)

    extrapolated = n != target
    measured_total = sum(row[2] for row in rows)
    target_total = sum(seconds * target_pairs / pairs for _, pairs, seconds, target_pairs, _ in rows)
    # What `threads` idle cores would take: this process's CPU time spread over them (other jobs' share removed).
    target_idle = sum(cpu * target_pairs / pairs for _, pairs, _, target_pairs, cpu in rows) / args.threads
    chamfer_pairs = sum(row[1] for row in rows[:3])
    ms_per_pair = 1e3 * sum(row[2] for row in rows[:3]) / chamfer_pairs
    label = f"at N = {target}" + (" (extrapolated)" if extrapolated else "")

    print(f"\nChamfer metric speed: N = {n} samples and references, {args.num_points} points, {args.device}, "
          f"{args.threads} threads, {args.dtype}; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"{'part':<15} {'pairs':>10} {'wall s':>9} {'CPU s':>9} {'wall ms/pair':>13} {'pairs ' + label:>32} "
          f"{'wall s ' + label:>33}")
    for name, pairs, seconds, target_pairs, cpu in rows:
        print(f"{name:<15} {pairs:>10,} {seconds:>9.2f} {cpu:>9.2f} {1e3 * seconds / pairs:>13.3f} {target_pairs:>32,} "
              f"{seconds * target_pairs / pairs:>33.1f}")
    print(f"{'total':<15} {'':>10} {measured_total:>9.2f} {sum(row[4] for row in rows):>9.2f} {'':>13} {'':>32} "
          f"{target_total:>33.1f}")
    verdict = "meets" if target_total < 600 else "misses"
    print(f"{label}: {target_total / 60:.1f} min on this machine as loaded -> {verdict} the 10-minute target; "
          f"{target_idle / 60:.1f} min on {args.threads} idle cores (CPU time / {args.threads})")
    print(f"(metrics on random clouds: MMD {metrics['mmd']:.4f}, COV {metrics['cov']:.3f}, "
          f"1-NNA {metrics['one_nna']:.3f})")
    print(json.dumps({
        "bench": "metric_speed",
        "num_clouds": n,
        "num_points": args.num_points,
        "device": args.device,
        "threads": args.threads,
        "dtype": args.dtype,
        "seconds_sr": round(rows[0][2], 3),
        "seconds_ss": round(rows[1][2], 3),
        "seconds_rr": round(rows[2][2], 3),
        "seconds_metrics": round(rows[3][2], 3),
        "seconds_total": round(measured_total, 3),
        "cpu_seconds_total": round(sum(row[4] for row in rows), 3),
        "ms_per_pair": round(ms_per_pair, 4),
        "target_clouds": target,
        "target_seconds_total": round(target_total, 1),
        "target_seconds_idle_cores": round(target_idle, 1),
        "extrapolated": extrapolated,
        "meets_10_min_target": bool(target_total < 600),
        "load_average": round(load_before, 2),
    }))


if __name__ == "__main__":
    main()
