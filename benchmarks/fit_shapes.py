"""Occupancy fitting quality and speed on ModelNet10 chairs (32³ voxel grids, shells filled).

    python benchmarks/fit_shapes.py                      # 64 chairs (a seeded subset), the default shape config
    python benchmarks/fit_shapes.py --num-fields 889     # all of them

IoU is measured on every voxel centre of each chair (held out: training points are random points in the
cube, half near the surface); the IoU on uniform random points is printed beside it. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shapes" / "modelnet10_chair_32.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--num-fields", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nef_transformers.data import default_fit_config, default_spec, load_source, select_indices
    from nef_transformers.fields import fit_neural_fields, occupancy_iou
    from nef_transformers.fields.siren import evaluate_in_chunks

    source = load_source(args.source)
    spec, config = default_spec(source), default_fit_config(source)
    indices = select_indices(len(source), args.num_fields, config.seed)
    start = time.perf_counter()
    result = fit_neural_fields(source, spec, config, indices=indices)
    seconds = time.perf_counter() - start
    uniform_iou = []
    for begin in range(0, len(indices), 64):
        batch = indices[begin:begin + 64]
        coords, occupancy = source.points(batch, config.eval_points, split="eval", seed=config.seed + 1)
        uniform_iou.append(occupancy_iou(evaluate_in_chunks(spec, result.weights[begin:begin + 64], coords), occupancy))
    uniform_iou = torch.cat(uniform_iou)
    iou = result.iou.numpy()
    print(f"\noccupancy fitting, {source.name}, {len(indices)} shapes, {spec}, {config.steps} steps, lr {config.lr}")
    print(f"{'IoU on':<28} {'mean':>7} {'min':>7} {'share >= 0.9':>13}")
    print(f"{'voxel centres (held out)':<28} {iou.mean():>7.4f} {iou.min():>7.4f} {np.mean(iou >= 0.9):>13.2f}")
    print(f"{'uniform random points':<28} {uniform_iou.mean():>7.4f} {uniform_iou.min():>7.4f} "
          f"{(uniform_iou >= 0.9).float().mean():>13.2f}")
    print(f"{len(indices) / seconds:.2f} NeFs/s ({seconds:.0f} s, {args.threads} threads)")
    print(json.dumps({
        "bench": "fit_shapes", "source": source.name, "num_fields": len(indices), "steps": config.steps,
        "spec": spec.to_dict(), "iou": round(float(iou.mean()), 4), "min_iou": round(float(iou.min()), 4),
        "uniform_iou": round(float(uniform_iou.mean()), 4), "nefs_per_s": round(len(indices) / seconds, 3),
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
