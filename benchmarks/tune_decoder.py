"""Tune the code strategy's decoders to NefGPT's prior, then score NefGPT's draws through them.

    python benchmarks/tune_decoder.py --source ../shared/data/shapes/modelnet10_chair_32.npz \\
        --out /tmp/gq_chairs_fn64 --strategies code --ae-encoder function --ae-epochs 160 --ae-batch-size 8 \\
        --epochs 60 --code-epochs 20 --keep-best --eval-steps 25 --mixture-covariance full --num-mixtures 64 \\
        --code-chunk-width 32 \\
        --top-k 64 --temperature 1.3 --sample-seeds 0 1 2 3 4 --baseline --threads 2

The experiments behind RESULTS.md, sessions 16 (the cycle term) and 17 (the realism term, ``--mmd-weight``). It works
on the folder of a `generation_quality.py` run of the code strategy, with that run's options (so its stages are
reused; any missing are computed first), and adds:

1. prior codes: ``--prior-codes`` draws of the run's NefGPT at the first ``--top-k`` and ``--prior-temperature``
   (default: the first ``--temperature``), with seeds from 10,000 up (never an evaluation seed);
2. a copy of the run's code VAE whose decoders are tuned to those codes and the training fields
   (`nef_transformers.tokenization.code.tune_decoder_to_prior`: the function-space reconstruction of the training
   fields plus ``--cycle-weight`` × the cycle error of the prior codes, and with ``--mmd-weight`` a realism term, the
   MMD between the prior codes' decoded fields and the training fields; the encoders stay fixed, so NefGPT's codes
   stay valid), saved under ``OUT/code/tuned_decoder`` (``--tuned-name``; reused when there, with the same
   settings);
3. NefGPT's draws for ``--sample-seeds`` at each ``--temperature`` (the run's cached samples, or new ones), decoded
   through the tuned decoders and scored like the benchmark's rows (`Run.evaluate_weights`); with ``--baseline`` the
   same codes through the run's own decoders too (a paired comparison: the codes are the same, only the decoders
   differ).

Prints the table (with each setting's mean over the draws), then one JSON line per row, and writes the first draw's
samples beside held-out items, per decoder and temperature, as
``OUT/code/<tuned name>/samples_<row>_t<temperature>_seed<seed>.png``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
PRIOR_SEED = 10_000  # prior codes are drawn with seeds from here up: never one of the evaluation's


def _generation_quality():
    spec = importlib.util.spec_from_file_location("generation_quality", HERE / "generation_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser():
    parser = _generation_quality().build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--prior-codes", type=int, default=10_000, help="NefGPT draws the decoders are tuned to")
    parser.add_argument("--tune-epochs", type=int, default=20, help="passes over the training fields")
    parser.add_argument("--cycle-weight", type=float, default=0.1, help="the cycle term's weight")
    parser.add_argument("--tune-lr", type=float, default=1e-4)
    parser.add_argument("--tune-batch-size", type=int, default=16)
    parser.add_argument("--mmd-weight", type=float, default=0.0,
                        help="weight of the realism term: the MMD between the prior's decoded fields and the training "
                             "fields (0: off)")
    parser.add_argument("--prior-temperature", type=float, default=None,
                        help="NefGPT's temperature for the prior codes (default: the first --temperature); the draws "
                             "are scored at every --temperature")
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning's batches and posterior draws")
    parser.add_argument("--tuned-name", default="tuned_decoder",
                        help="folder under OUT/code for the tuned VAE (another name keeps several side by side)")
    parser.add_argument("--tuned-reconstruction", action="store_true",
                        help="also measure how the tuned decoders reconstruct training and held-out fields through "
                             "their codes (`Run.reconstruction_row`; fits the held-out fields first when missing)")
    parser.add_argument("--baseline", action="store_true",
                        help="also score the same codes through the run's own decoders (paired comparison)")
    return parser


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.prior_codes < 1:
        raise SystemExit(f"--prior-codes must be >= 1, got {args.prior_codes}")
    import torch

    from nef_transformers.data.metadata import get_source_info, get_spec, weights_tensor
    from nef_transformers.experiment import Run, metrics_table, save_samples_figure, seed_means
    from nef_transformers.pipelines.neural_field_generation import load_generation_folder
    from nef_transformers.tokenization.code import NefCodeVAE, tune_decoder_to_prior
    from nef_transformers.tokenization.train import SHAPE_AUTOENCODER_POINTS, SHAPE_AUTOENCODER_POOL, field_coords

    if args.threads:
        torch.set_num_threads(args.threads)
    gq = _generation_quality()
    if args.quick:  # the folder of a --quick run: its sizes
        args.num_items = args.num_items or gq.QUICK["num_items"]
        args.epochs = gq.QUICK["epochs"]
    config = gq.run_config(args)
    config.strategy = "code"
    config.num_train_epochs = args.code_epochs or args.epochs
    run = Run(Path(args.out), config, device=args.device)
    fields = run.fit()
    spec, source = get_spec(fields), get_source_info(fields)
    top_k = args.top_k[0]
    prior_temperature = args.prior_temperature or args.temperature[0]
    settings = {"prior_codes": args.prior_codes, "top_k": top_k, "temperature": prior_temperature,
                "epochs": args.tune_epochs, "cycle_weight": args.cycle_weight, "lr": args.tune_lr,
                "batch_size": args.tune_batch_size, **({"mmd_weight": args.mmd_weight} if args.mmd_weight else {}),
                **({"seed": args.tune_seed} if args.tune_seed else {})}
    folder = run.strategy_dir("code") / args.tuned_name
    saved = folder / "tune.json"
    started = time.perf_counter()
    if saved.is_file() and json.loads(saved.read_text(encoding="utf-8"))["settings"] == settings:
        tuned = NefCodeVAE.from_pretrained(folder)
        print(f"reusing the tuned decoders in {folder}", flush=True)
    else:
        model, _ = load_generation_folder(run.train("code"))
        model.to(run.device).eval()
        with torch.no_grad():
            prior = torch.cat([model.sample(num_samples=min(1000, args.prior_codes - start),
                                            temperature=prior_temperature,
                                            top_k=top_k, seed=PRIOR_SEED + start).float().cpu()
                               for start in range(0, args.prior_codes, 1000)])
        tuned = run.code_vae().cpu()
        occupancy = source.get("kind") == "occupancy"
        coords = field_coords(source, spec, num_points=SHAPE_AUTOENCODER_POOL if occupancy else 4096)
        history = tune_decoder_to_prior(tuned, weights_tensor(fields).float(), prior, coords, epochs=args.tune_epochs,
                                        cycle_weight=args.cycle_weight, lr=args.tune_lr,
                                        batch_size=args.tune_batch_size, mmd_weight=args.mmd_weight,
                                        seed=args.tune_seed,
                                        points_per_step=SHAPE_AUTOENCODER_POINTS if occupancy else None)
        tuned.save_pretrained(folder)
        saved.write_text(json.dumps({"settings": settings, "history": history}, indent=2), encoding="utf-8")
    tuned = tuned.to(run.device).eval()
    name = "code-tuned" if args.tuned_name == "tuned_decoder" else f"code-{args.tuned_name}"
    decoders = {name: tuned, **({"code": run.code_vae()} if args.baseline else {})}
    rows, pictures = [], []
    for temperature, seed in [(t, s) for t in args.temperature for s in args.sample_seeds]:
        _, sequences = run.sample("code", top_k=top_k, temperature=temperature, seed=seed, return_sequences=True)
        for name, vae in decoders.items():
            with torch.no_grad():
                latents = vae.decode_latents(sequences.to(run.device))
                weights = vae.autoencoder.decode(latents).float().cpu()
            rows.append(run.evaluate_weights(weights, name, {"top_k": top_k, "temperature": temperature,
                                                             "seed": seed}, latents=latents.cpu()))
            if seed == args.sample_seeds[0]:  # the first draw's samples beside held-out items, per decoder
                picture = folder / f"samples_{name}_t{temperature:g}_seed{seed}.png"
                pictures.append(save_samples_figure(run, weights, picture,
                                                    title=f"{name}: NefGPT's codes (top-k {top_k}, T {temperature:g}, "
                                                          f"seed {seed}) through {name}'s decoders"))
    rows += seed_means(rows)
    print(metrics_table(rows), flush=True)
    if args.tuned_reconstruction:
        reconstructions = [{**run.reconstruction_row("code", code_vae=vae), "strategy": f"reconstruction-{name}"}
                           for name, vae in decoders.items()]
        print(gq.reconstruction_table(reconstructions), flush=True)
        for row in reconstructions:
            print(json.dumps({"bench": "tune_decoder", "source": str(args.source), "tuning": settings, **row},
                             default=float), flush=True)
    for row in rows:
        print(json.dumps({"bench": "tune_decoder", "source": str(args.source), "tuning": settings,
                          **{k: row.get(k) for k in ("strategy", "temperature", "seed", "mmd", "cov", "one_nna",
                                                     "one_nna_samples", "one_nna_references", "memorisation_ratio",
                                                     "latent_nn_ratio", "invalid")}}, default=float), flush=True)
    for picture in pictures:
        print(f"samples: {picture}", file=sys.stderr)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
