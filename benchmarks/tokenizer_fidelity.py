"""Tokenizer fidelity: how much of a field survives each tokenization (issue 3).

For held-out MNIST fields and ModelNet chair fields, per strategy: tokens per field, mean PSNR (images,
fit-a-nef's definition, against the images) or IoU (shapes, held-out points) of the fields decoded from the
tokens vs the original fields, codebook usage on the training fields (share of codes in use, perplexity),
and encode/decode throughput. Strategies:

- ``naive``: per-neuron chunks of ``w - w_init`` (continuous, lossless by construction);
- ``vq``: `NefVQTokenizer` with the default `VQTokenizerConfig` (per-scalar, one 1,024-code codebook);
- ``vq[canonical=align]``, ``vq[canonical=sort]``: the same after a hidden-unit canonical form (the
  permutation-symmetry measurement: is a canonical order better than the shared init alone?);
- ``vq-compact``: per-neuron residual VQ, 3 levels of 1,024 codes (195 codes + BOS/EOS for MNIST);
- ``learned``: the `NefAutoencoder` latents (continuous; trained ``--ae-epochs`` epochs);
- ``ideal-coder bound`` (MNIST only): the fewest bits per field any code could use to stay within 1 dB, and
  the loss an ideal code would have at the budgets of <= 256 tokens (linearised fields, reverse water-filling
  over the eigen-directions of ``J diag(σ)``; ``J`` the Jacobian of the field's pixels w.r.t. its weights,
  ``σ`` the per-weight spread of ``w - w_init`` over the training fields). The code is told each field's own
  Jacobian, which no decoder knows before it decodes;
- ``fixed-code bound`` (MNIST only): the same for a code whose decoder is one map for all fields: the full
  covariance of ``w - w_init`` (correlations between weights used) under the mean ``JᵀJ`` of the training
  fields. Both bounds model the weights as Gaussian and the fields as linear near each field.

Prints a table, then one JSON line per strategy and source. Fitting is the slow part: pass saved weight
datasets (``save_to_disk`` / fit folders) to reuse them.

    python benchmarks/tokenizer_fidelity.py --mnist-nefs /tmp/nefcache/mnist5000 --chair-nefs /tmp/nefcache/chairs192
    python benchmarks/tokenizer_fidelity.py --mnist-fields 1000 --chair-fields 64   # fits them first (minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

CHAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "shapes" / "modelnet10_chair_32.npz"


# ------------------------------------------------------------------------------------------------ data
def load_or_fit(kind: str, path: str | None, num_fields: int):
    from nef_transformers.data.sources import default_fit_config, default_spec, load_source
    from nef_transformers.data.weights import build_nef_dataset, load_nef_dataset

    source = load_source("mnist" if kind == "image" else str(CHAIRS))
    if path:
        return load_nef_dataset(path), source
    dataset = build_nef_dataset(source, spec=default_spec(source), config=default_fit_config(source),
                                num_fields=num_fields)
    return dataset, source


def quality(dataset, source, weights: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Per-field PSNR against the images, or IoU on the held-out points the fitter evaluates on."""
    from nef_transformers.data.metadata import get_spec, nef_metadata
    from nef_transformers.fields import evaluate_in_chunks, occupancy_iou, psnr_fit_a_nef

    spec = get_spec(dataset)
    indices = [int(i) for i in np.asarray(dataset["index"])[rows]]
    if source.kind == "image":
        outputs = evaluate_in_chunks(spec, weights, source.coords())
        return psnr_fit_a_nef(outputs, source.signals(indices), source.mean, source.std)
    seed = nef_metadata(dataset)["fit"].get("seed", 0)
    coords, occupancy = source.points(indices, 16384, split="eval", seed=seed)
    return occupancy_iou(evaluate_in_chunks(spec, weights, coords), occupancy)


def throughput(fn, weights: torch.Tensor, target_fields: int = 5000) -> float:
    """Fields per second of ``fn`` on ``target_fields`` fields (the weights repeated as needed)."""
    repeats = math.ceil(target_fields / len(weights))
    batch = weights.repeat(repeats, 1)[:target_fields]
    start = time.perf_counter()
    fn(batch)
    return target_fields / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ bound
def water_fill(power: torch.Tensor, *, distortion: float | None = None, bits: float | None = None):
    """Reverse water-filling over independent Gaussian directions of variances ``power``: give one of the
    target ``distortion`` (summed) or the bit budget ``bits``, get ``(bits, distortion)`` of the optimal code.

    A direction of variance λ costs ½·log2(λ/θ) bits and leaves min(λ, θ) error, θ the water level. The level
    may sit below the smallest variance (every direction coded): the search reaches far below it."""
    if (distortion is None) == (bits is None):
        raise ValueError("water_fill: give exactly one of distortion= and bits=")
    power = power.double().clamp_min(1e-300)

    def at(theta):
        level = torch.tensor(theta, dtype=power.dtype)
        return float((0.5 * torch.log2(power / level)).clamp_min(0).sum()), float(torch.minimum(power, level).sum())

    lo, hi = math.log(float(power.min())) - 60.0, math.log(float(power.max()))
    for _ in range(200):  # bisection on log θ: distortion rises and bits fall with θ
        mid = (lo + hi) / 2
        rate, error = at(math.exp(mid))
        if (error <= distortion) if distortion is not None else (rate >= bits):
            lo = mid
        else:
            hi = mid
    return at(math.exp(lo))


def _image_mse(psnr_db) -> float:
    """Mean squared error (images in [0, 1]) of a PSNR in dB, averaged over fields."""
    return float(np.mean(10 ** (-np.asarray(psnr_db, dtype=np.float64) / 10)))


def ideal_coder_bound(spec, weights_test, train_residuals, source, rows_indices, budgets, num_fields=8):
    """Mean over ``num_fields`` held-out MNIST fields of (bits for a 1 dB drop, drop at each bit budget).

    The code is told each field's own Jacobian (an oracle no real decoder has): the most a code could gain."""
    from torch.func import jacrev

    from nef_transformers.fields import psnr_fit_a_nef, siren_forward

    coords = source.coords()
    spread = train_residuals.std(0)
    bits_for_1db, drops = [], {b: [] for b in budgets}
    for row in range(min(num_fields, len(weights_test))):
        w = weights_test[row].clone()
        jacobian = jacrev(lambda v: siren_forward(spec, v[None], coords)[0, :, 0])(w)  # (n, p)
        scaled = (jacobian * spread).double()
        power = torch.linalg.eigvalsh(scaled.T @ scaled).clamp_min(1e-30)  # output energy per direction
        target = source.signals([rows_indices[row]])
        with torch.no_grad():
            mse0 = _image_mse(psnr_fit_a_nef(siren_forward(spec, w[None], coords), target, source.mean, source.std))
        to_image = float(np.mean(source.std) ** 2) / coords.shape[0]  # summed normalised error -> image MSE
        bits_for_1db.append(water_fill(power, distortion=mse0 * (10 ** 0.1 - 1) / to_image)[0])
        for budget in budgets:
            error = water_fill(power, bits=budget)[1]
            drops[budget].append(10 * math.log10(1 + error * to_image / mse0))
    return float(np.mean(bits_for_1db)), {b: float(np.mean(v)) for b, v in drops.items()}


def fixed_code_bound(spec, weights_train, train_residuals, train_psnr, source, num_fields=100):
    """Bits per field a Gaussian-model code needs for a 1 dB drop when its decoder is one fixed map for every
    field: the weights' full covariance over the training fields, the error weighted by the mean over
    ``num_fields`` training fields of JᵀJ (the expected output error of a weight error independent of the
    field). A fixed codebook can use the correlations between weights, but not one field's own Jacobian."""
    from torch.func import jacrev

    from nef_transformers.fields import siren_forward

    coords = source.coords()
    metric = torch.zeros(weights_train.shape[1], weights_train.shape[1], dtype=torch.float64)
    chosen = range(min(num_fields, len(weights_train)))
    for row in chosen:
        jacobian = jacrev(lambda v: siren_forward(spec, v[None], coords)[0, :, 0])(weights_train[row].clone())
        metric += jacobian.double().T @ jacobian.double() / len(chosen)
    values, vectors = torch.linalg.eigh(metric)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    power = torch.linalg.eigvalsh(root @ torch.cov(train_residuals.double().T) @ root)
    to_image = float(np.mean(source.std) ** 2) / coords.shape[0]
    return water_fill(power, distortion=_image_mse(train_psnr) * (10 ** 0.1 - 1) / to_image)[0]


# ------------------------------------------------------------------------------------------------ main
def run_source(name, dataset, source, args):
    from nef_transformers.data.metadata import get_shared_init, get_spec, weights_tensor
    from nef_transformers.tokenization import NeuronChunker
    from nef_transformers.tokenization.learned import NefAutoencoderConfig, train_autoencoder
    from nef_transformers.tokenization.train import (COMPACT_VQ_CONFIG, VQTokenizerConfig, codebook_usage,
                                                     field_coords, train_vq_tokenizer)

    spec, init = get_spec(dataset), get_shared_init(dataset)
    weights = weights_tensor(dataset)
    order = np.random.default_rng(0).permutation(len(dataset))
    num_test = max(1, int(round(args.test_fraction * len(dataset))))
    test, train = np.sort(order[:num_test]), np.sort(order[num_test:])
    original = quality(dataset, source, weights[test], test)
    if source.kind == "image" and "psnr" in dataset.column_names:  # the fit's own PSNR: were these its images?
        stored = torch.as_tensor(np.asarray(dataset["psnr"])[test], dtype=original.dtype)
        if float((stored - original).abs().mean()) > 0.5:
            raise SystemExit(f"{name}: the fields' stored PSNR ({float(stored.mean()):.2f} dB) is not their PSNR "
                             f"against the source's images at their `index` ({float(original.mean()):.2f} dB): the "
                             "weight dataset was fitted to other items (a subset?); pass the fields of "
                             "`nef-transformers fit` on the whole source, or let this script fit them")
    metric = "psnr" if source.kind == "image" else "iou"
    rows = []

    def record(strategy, tokens, decoded_weights, encode_fn=None, usage=None, extra=None):
        decoded = quality(dataset, source, decoded_weights, test)
        row = {"bench": "tokenizer_fidelity", "source": name, "strategy": strategy, "tokens_per_field": tokens,
               "original_psnr_db": None, "decoded_psnr_db": None, "psnr_drop_db": None, "original_iou": None,
               "decoded_iou": None, "codes_in_use": None, "encode_fields_per_s": None}
        if metric == "psnr":
            row.update(original_psnr_db=round(float(original.mean()), 3), decoded_psnr_db=round(float(decoded.mean()), 3),
                       psnr_drop_db=round(float((original - decoded).mean()), 3))
        else:
            row.update(original_iou=round(float(original.mean()), 4), decoded_iou=round(float(decoded.mean()), 4),
                       iou_drop=round(float((original - decoded).mean()), 4))
        if usage is not None:
            row.update(codes_in_use=round(usage["codes_in_use"], 4), dead_codes=round(usage["dead_codes"], 4),
                       perplexity=round(usage["perplexity"], 1), codebook_size=usage["codebook_size"])
        if encode_fn is not None:
            row["encode_fields_per_s"] = round(throughput(encode_fn, weights, args.throughput_fields), 1)
            row["throughput_fields"] = args.throughput_fields
        row.update(extra or {})
        row.update(train_fields=len(train), test_fields=len(test))
        rows.append(row)
        print(f"[{name}] {strategy}: done", file=sys.stderr, flush=True)

    # 1. naive: continuous per-neuron chunks (exact)
    chunker = NeuronChunker(spec, init, "neuron")
    record("naive", chunker.num_chunks, chunker.from_chunks(chunker.to_chunks(weights[test])),
           encode_fn=chunker.to_chunks, extra={"chunk_width": chunker.chunk_width})

    # 2. vq variants
    variants = [("vq", VQTokenizerConfig()),
                ("vq[canonical=align]", VQTokenizerConfig(canonical="align")),
                ("vq[canonical=sort]", VQTokenizerConfig(canonical="sort")),
                ("vq-compact", COMPACT_VQ_CONFIG)]
    for strategy, config in variants:
        if init is None and config.canonical == "align":
            continue
        start = time.perf_counter()
        tokenizer, _ = train_vq_tokenizer(weights[train], spec, init, config, progress=False)
        train_s = time.perf_counter() - start
        train_ids = tokenizer.encode_weights(weights[train])
        ids = tokenizer.encode_weights(weights[test])
        decode_s = time.perf_counter()
        decoded = tokenizer.decode_weights(ids)
        decode_rate = len(test) / (time.perf_counter() - decode_s)
        record(strategy, tokenizer.tokens_per_field, decoded, encode_fn=tokenizer.encode_weights,
               usage=codebook_usage(tokenizer, train_ids),
               extra={"sequence_length": tokenizer.sequence_length, "vocab_size": tokenizer.vocab_size,
                      "decode_fields_per_s": round(decode_rate, 1), "train_s": round(train_s, 1),
                      "settings": {k: v for k, v in config.to_dict().items()
                                   if k in ("chunking", "levels", "codebook_size", "codebook_grouping", "canonical")}})

    # 3. learned embedding
    if args.ae_epochs > 0:
        config = NefAutoencoderConfig(spec=spec.to_dict())
        start = time.perf_counter()
        model, info = train_autoencoder(weights[train], spec, init, field_coords(source.describe(), spec), config,
                                        epochs=args.ae_epochs, progress=False)
        train_s = time.perf_counter() - start
        with torch.no_grad():
            decoded = model.decode(model.encode(weights[test]))
            record("learned", model.num_tokens, decoded, encode_fn=model.encode,
                   extra={"latent_dim": config.latent_dim, "epochs": args.ae_epochs, "train_s": round(train_s, 1),
                          "final_function_mse": round(info["function_mse"], 5)})

    # 4. what no tokenizer can beat (MNIST): bits a code needs for a 1 dB drop, with and without an oracle
    def bound_row(strategy, bits, fields, **extra):
        per_token = bits / 256  # the issue's budget: <= 256 tokens, so each token must carry this many bits
        return {"bench": "tokenizer_fidelity", "source": name, "strategy": strategy, "bits_for_1db_drop": round(bits),
                "bits_per_token_at_256": round(per_token, 1), "codes_per_token_at_256": round(2 ** per_token),
                "fields": fields, **extra}

    residuals = weights[train] - (0 if init is None else init)
    if source.kind == "image" and args.bound_fields > 0:
        budgets = {"195 tokens x 10 bits (1,024 codes)": 1950, "254 tokens x 14 bits (16,384 codes)": 254 * 14,
                   "1,185 tokens x 10 bits (per scalar)": 1185 * 10}
        indices = [int(i) for i in np.asarray(dataset["index"])[test]]
        bits, drops = ideal_coder_bound(spec, weights[test], residuals, source, indices, list(budgets.values()),
                                        args.bound_fields)
        rows.append(bound_row("ideal-coder bound", bits, min(args.bound_fields, len(test)),
                              ideal_drop_db={label: round(drops[b], 2) for label, b in budgets.items()}))
    if source.kind == "image" and args.metric_fields > 0:
        train_psnr = quality(dataset, source, weights[train], train)
        bits = fixed_code_bound(spec, weights[train], residuals, train_psnr, source, args.metric_fields)
        rows.append(bound_row("fixed-code bound", bits, min(args.metric_fields, len(train))))
    return rows


def print_table(rows):
    header = (f"{'source':<8} {'strategy':<22} {'tokens':>7} {'orig':>8} {'decoded':>8} {'drop':>7} "
              f"{'in use':>7} {'perplex':>8} {'enc f/s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["strategy"].endswith("bound"):
            print(f"{row['source']:<8} {row['strategy']:<22} needs {row['bits_for_1db_drop']} bits/field for a 1 dB "
                  f"drop: {row['bits_per_token_at_256']} bits ({row['codes_per_token_at_256']:,} codes) a token at "
                  "256 tokens"
                  + "".join(f"; ideal drop at {k}: {v} dB" for k, v in row.get("ideal_drop_db", {}).items()))
            continue
        orig = row["original_psnr_db"] if row["original_psnr_db"] is not None else row["original_iou"]
        decoded = row["decoded_psnr_db"] if row["decoded_psnr_db"] is not None else row["decoded_iou"]
        drop = row["psnr_drop_db"] if row["psnr_drop_db"] is not None else row.get("iou_drop")
        fmt = lambda v, spec: format("-", f">{spec.split('.')[0]}") if v is None else format(v, spec)  # noqa: E731
        print(f"{row['source']:<8} {row['strategy']:<22} {row['tokens_per_field']:>7} {fmt(orig, '8.3f')} "
              f"{fmt(decoded, '8.3f')} {fmt(drop, '7.3f')} {fmt(row['codes_in_use'], '7.3f')} "
              f"{fmt(row.get('perplexity'), '8.1f')} {fmt(row['encode_fields_per_s'], '9.1f')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-nefs", help="saved MNIST weight dataset (default: fit --mnist-fields fields)")
    parser.add_argument("--mnist-fields", type=int, default=1000, help="0 skips MNIST")
    parser.add_argument("--chair-nefs", help="saved chair weight dataset (default: fit --chair-fields fields)")
    parser.add_argument("--chair-fields", type=int, default=64, help="0 skips the chairs")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="held-out share of the fields")
    parser.add_argument("--ae-epochs", type=int, default=5, help="autoencoder epochs (0 skips `learned`)")
    parser.add_argument("--bound-fields", type=int, default=8, help="fields for the ideal-coder bound (0 skips it)")
    parser.add_argument("--metric-fields", type=int, default=100,
                        help="training fields whose Jacobians average into the fixed-code bound's metric (0 skips it)")
    parser.add_argument("--throughput-fields", type=int, default=5000, help="fields encoded for the throughput")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's budget: 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    rows = []
    if args.mnist_nefs or args.mnist_fields > 0:
        dataset, source = load_or_fit("image", args.mnist_nefs, args.mnist_fields)
        rows += run_source("mnist", dataset, source, args)
    if args.chair_nefs or args.chair_fields > 0:
        if args.chair_nefs or CHAIRS.is_file():
            dataset, source = load_or_fit("occupancy", args.chair_nefs, args.chair_fields)
            rows += run_source("chairs", dataset, source, args)
        else:
            print(f"skipping chairs: {CHAIRS} is absent")
    print()
    print_table(rows)
    print()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
