"""Tune the code strategy's decoders to NefGPT's prior, then score NefGPT's draws through them.

    python benchmarks/tune_decoder.py --source ../shared/data/shapes/modelnet10_chair_32.npz \\
        --out /tmp/gq_chairs_fn64 --strategies code --ae-encoder function --ae-epochs 160 --ae-batch-size 8 \\
        --epochs 60 --code-epochs 20 --keep-best --eval-steps 25 --mixture-covariance full --num-mixtures 64 \\
        --code-chunk-width 32 \\
        --top-k 64 --temperature 1.3 --sample-seeds 0 1 2 3 4 --baseline --threads 2

The experiments behind RESULTS.md, sessions 16 (the cycle term) and 17 (the realism term, ``--mmd-weight``; this
script's default stays 0, the cycle term alone, so session 16's commands reproduce). One command that trains,
tunes and scores is ``generation_quality.py --strategies code --tune-decoders`` (realism weight 1 by default); this
script works on the folder of such a run, with that run's options (so its stages are reused; any missing are
computed first), and adds:

1. `Run.tune_decoders`: ``--prior-codes`` draws of the run's NefGPT at the first ``--top-k`` and
   ``--prior-temperature`` (default: the first ``--temperature``), with seeds from 10,000 up (never an evaluation
   seed), then a copy of the run's code VAE whose decoders are tuned to those codes and the training fields
   (`nef_transformers.tokenization.code.tune_decoder_to_prior`: the function-space reconstruction of the training
   fields plus ``--cycle-weight`` × the cycle error of the prior codes, and with ``--mmd-weight`` a realism term, the
   MMD between the prior codes' decoded fields and the training fields; the encoders stay fixed, so NefGPT's codes
   stay valid), saved as a generation folder ``OUT/code/tuned`` (``--tuned-name``; reused with the same settings,
   refused with others);
2. NefGPT's draws for ``--sample-seeds`` at each ``--temperature`` (the run's cached samples, or new ones), decoded
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


def _generation_quality():
    spec = importlib.util.spec_from_file_location("generation_quality", HERE / "generation_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser():
    parser = _generation_quality().build_parser()  # its tuning options (`Run.tune_decoders`) included
    parser.description = __doc__.split("\n\n")[0]
    # the cycle term alone unless asked (session 16's commands); generation_quality's --tune-decoders defaults to 1
    parser.set_defaults(mmd_weight=0.0)
    parser.add_argument("--tuned-reconstruction", action="store_true",
                        help="also measure how the tuned decoders reconstruct training and held-out fields through "
                             "their codes (`Run.reconstruction_row`; fits the held-out fields first when missing)")
    parser.add_argument("--baseline", action="store_true",
                        help="also score the same codes through the run's own decoders (paired comparison)")
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    gq = _generation_quality()
    gq.check_tuning_args(parser, args)
    import torch

    from nef_transformers.experiment import Run, decode_codes, metrics_table, save_samples_figure, seed_means

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # the folder of a --quick run: its sizes
        args.num_items = args.num_items or gq.QUICK["num_items"]
        args.epochs = gq.QUICK["epochs"]
    config = gq.run_config(args)
    config.strategy = "code"
    config.num_train_epochs = args.code_epochs or args.epochs
    run = Run(Path(args.out), config, device=args.device)
    tuning, top_k, prior_temperature = gq.decoder_tuning(args)
    settings = tuning.settings(top_k, prior_temperature)
    started = time.perf_counter()
    folder = run.tune_decoders(top_k, prior_temperature, tuning, args.tuned_name)
    tuned = run.tuned_code_vae(folder)
    name = gq.tuned_row_name(args.tuned_name)
    decoders = {name: tuned, **({"code": run.code_vae()} if args.baseline else {})}
    rows, pictures = [], []
    for temperature, seed in [(t, s) for t in args.temperature for s in args.sample_seeds]:
        _, sequences = run.sample("code", top_k=top_k, temperature=temperature, seed=seed, return_sequences=True)
        for name, vae in decoders.items():
            weights, latents = decode_codes(vae, sequences)
            rows.append(run.evaluate_weights(weights, name, {"top_k": top_k, "temperature": temperature,
                                                             "seed": seed}, latents=latents))
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
