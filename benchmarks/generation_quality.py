"""Generation quality, HyperDiffusion's protocol: fit -> tokenize -> train -> sample |test| -> evaluate on held-out items.

    python benchmarks/generation_quality.py --source mnist                 # 4,000 / 1,000 embedded digits
    python benchmarks/generation_quality.py --source ../shared/data/shapes/modelnet10_chair_32.npz   # 711 / 178
    python benchmarks/generation_quality.py --quick                        # a few hundred fields, minutes

For each strategy (``--strategies``) it trains one NefGPT and samples it on the grid top-k x temperature
(``--top-k 3 5 8 --temperature 0.8 1.0``: the proposal's table plus top-k 8, all of the regression head's 8
mixture components). In the same run: ``oracle-train`` (training fields as the generator: the i.i.d. ceiling),
``noisy-train`` (training weights plus noise), ``gaussian`` (a Gaussian fitted in weight space) and, with the
learned strategy, ``autoencoder-train`` (the oracle's training fields through its autoencoder: what a perfect prior
over the latents would score), ``gaussian-latent`` (one Gaussian fitted to the training fields' latents, decoded:
the trivial prior NefGPT has to beat) and ``noisy-latent`` (training fields with noise on their latents, decoded:
jittered copies, what the metrics give a generator that learned nothing but the training set); with the code
strategy (a VAE's codes over those latents, `NefCodeVAE`), ``autoencoder-train`` (when the learned strategy does
not write it), ``code-train`` (the oracle's fields through the VAE: the ceiling of a prior over the codes) and
``gaussian-code`` (codes from the VAE's prior N(0, I)) and, for each sampling seed, ``mixture-code`` (a mixture of
``--code-mixture`` full-covariance Gaussians fitted to NefGPT's training codes, decoded: the classical prior
NefGPT has to beat on the same VAE). ``--skip-baselines`` leaves out the oracle and weight-space
rows, for reruns that vary one strategy's settings; ``--sample-seeds 0 1 2`` draws each setting's samples
several times (a row each, then a ``mean of N seeds`` row with the 1-NNA's standard error: on the chairs one draw
spreads by 1.3-2.7 points), and ``--samples-only`` writes nothing but those rows. ``--reconstruction`` adds, for
the learned and code strategies, whether their autoencoder generalises: it fits the held-out items too (only for
this) and prints the reconstruction IoU (shapes) or PSNR (images) of training and of held-out fields, beside each
held-out field's most alike training field (`Run.reconstruction_row`; a table and one ``"bench":
"reconstruction"`` JSON line each). ``--tune-decoders`` (code strategy) tunes a copy of the code VAE's decoders to
NefGPT's own draws at the first top-k and ``--prior-temperature`` (`Run.tune_decoders`: the cycle term and, with
``--mmd-weight`` 1 by default, the realism term; RESULTS.md sessions 16-18) into the generation folder
OUT/code/tuned, then scores each draw's codes through them too (``code-tuned`` rows: the same codes, other
decoders; the pipeline samples through them from that folder). Every generator row: MMD,
COV, 1-NNA against the held-out test items, the Fréchet distance on a classifier trained on the training split,
the memorisation ratio (median nearest-training distance of samples / of held-out real items), for rows drawn as
learned latents the latent NN ratio (the same in the autoencoder's latent space, the training set leave-one-out as
the reference: copies read far below 1) and, for labelled images, the share of samples the classifier recognises
with confidence >= 0.9 and the spread over classes.

Writes OUT/generation_quality.md (table), OUT/generation_quality.json and OUT/samples_{strategy}.png (samples
beside real items: the first draw of the setting with the best mean 1-NNA; a rerun with ``--skip-baselines`` or
``--samples-only`` adds a time stamp to each name instead of overwriting them); prints the table, then one JSON line
per row. Stages are cached in OUT (`nef_transformers.experiment`): re-running reuses fitted fields, tokenizers and
models.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Per-strategy training settings. The VQ sequences are one token per weight (1,187 positions on MNIST), ~18x
# the continuous chunks' 65, so the same number of steps costs ~18x more: capped by --vq-steps.
QUICK = dict(num_items=500, epochs=20, vq_steps=150)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (also read by `benchmarks/tune_decoder.py`, which works on this script's folders)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--out", default=None, help="work folder (default runs/generation_quality_<source>[_quick])")
    parser.add_argument("--strategies", nargs="+", default=["naive", "vq", "learned"],
                        choices=["naive", "vq", "learned", "code"])
    parser.add_argument("--top-k", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.8, 1.0])
    parser.add_argument("--num-items", type=int, default=None, help="seeded subset of the source (default: all)")
    parser.add_argument("--epochs", type=int, default=30, help="NefGPT epochs (continuous strategies)")
    parser.add_argument("--vq-steps", type=int, default=600, help="NefGPT optimizer steps for the vq strategy")
    parser.add_argument("--vq-batch-size", type=int, default=8, help="NefGPT batch for the vq strategy (1,187-token rows)")
    parser.add_argument("--hidden-size", type=int, default=128, help="NefGPT width")
    parser.add_argument("--num-layers", type=int, default=4, help="NefGPT layers")
    parser.add_argument("--heads", type=int, default=4, help="NefGPT attention heads")
    parser.add_argument("--num-mixtures", type=int, default=8, help="NefGPT regression head: mixture components")
    parser.add_argument("--mixture-covariance", choices=("diagonal", "full"), default="diagonal",
                        help="NefGPT regression head: each component's covariance over a chunk (full: a Cholesky "
                             "factor; RESULTS.md, session 13)")
    parser.add_argument("--dropout", type=float, default=0.0, help="NefGPT hidden and attention dropout")
    parser.add_argument("--chunk-noise", type=float, default=0.0,
                        help="NefGPT (continuous strategies): training noise on the chunks, in units of their std")
    parser.add_argument("--batch-size", type=int, default=32, help="NefGPT batch (continuous strategies)")
    parser.add_argument("--lr", type=float, default=1e-3, help="NefGPT peak learning rate")
    parser.add_argument("--keep-best", action="store_true",
                        help="NefGPT: keep the weights of the lowest validation loss (--keep_best_model)")
    parser.add_argument("--eval-steps", type=int, default=200,
                        help="NefGPT's validation loss every N steps (with --keep-best, where the kept weights come from)")
    parser.add_argument("--ae-epochs", type=int, default=45, help="learned strategy: autoencoder epochs")
    parser.add_argument("--ae-hidden-size", type=int, default=128,
                        help="learned strategy: autoencoder width (x 2 layers, 45 epochs: 128 -> 1-NNA 66.6 %%, 64 "
                             "(30 epochs) -> 70.4 %%, 32 x 1 (15 epochs) -> 85.8 %%; ~22 min on 2 CPU cores at 128)")
    parser.add_argument("--ae-layers", type=int, default=2, help="learned strategy: autoencoder layers (each side)")
    parser.add_argument("--ae-latent-dim", type=int, default=4, help="learned strategy: latent width per neuron")
    parser.add_argument("--ae-latent-noise", type=float, default=0.0,
                        help="learned strategy: training noise on the latents, in units of their std (NefAutoencoderConfig)")
    parser.add_argument("--ae-encoder", choices=("weights", "function"), default="weights",
                        help="learned strategy: what the autoencoder's encoder reads, the neurons' weights or the "
                             "field on a lattice (a CNN; chairs: held-out reconstruction IoU 0.54 against 0.33). The "
                             "default stays weights here so the commands in RESULTS.md reproduce; the quickstart's "
                             "and RunConfig's default is function")
    parser.add_argument("--ae-batch-size", type=int, default=None,
                        help="learned strategy: autoencoder fields per step (default: 16 for shapes, 64 for images)")
    parser.add_argument("--code-mixture", type=int, default=8,
                        help="code strategy: components of the mixture-code baseline rows (0: no such rows)")
    parser.add_argument("--code-dim", type=int, default=32, help="code strategy: numbers per field's code")
    parser.add_argument("--code-chunk-width", type=int, default=4,
                        help="code strategy: code numbers per NefGPT position (must divide --code-dim; "
                             "--code-dim: one position, a mixture over the whole code)")
    parser.add_argument("--code-sigma2", type=float, default=0.3,
                        help="code strategy: the VAE's fixed likelihood variance (larger: fewer code dimensions in use)")
    parser.add_argument("--code-steps", type=int, default=4000, help="code strategy: VAE optimizer steps")
    parser.add_argument("--code-draws", type=int, default=8,
                        help="code strategy: posterior draws per training field in NefGPT's training set (0: means)")
    parser.add_argument("--code-drop-inactive", action="store_true",
                        help="code strategy: NefGPT models only the code dimensions in use (NefCodeConfig.drop_inactive)")
    parser.add_argument("--code-epochs", type=int, default=None,
                        help="code strategy: NefGPT epochs over its (fields x draws) rows (default: --epochs)")
    parser.add_argument("--noise-scale", type=float, default=0.5, help="noisy-train: noise std / parameter std")
    parser.add_argument("--latent-noise-scale", type=float, default=0.3,
                        help="noisy-latent: noise std / each latent entry's std")
    parser.add_argument("--sample-seeds", type=int, nargs="+", default=[0],
                        help="one row per sampling seed and setting, then their mean (178 against 178 chairs: one "
                             "draw's 1-NNA spreads by 1.3-2.7 points)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="leave out the oracle and weight-space baseline rows (~7 min on the chairs): for a "
                             "rerun that varies a strategy's settings in a folder whose table already has them")
    parser.add_argument("--samples-only", action="store_true",
                        help="only the generator's rows (implies --skip-baselines, and leaves out each strategy's "
                             "ceiling and trivial-prior rows): more sampling seeds for a trained model")
    parser.add_argument("--reconstruction", action="store_true",
                        help="learned / code strategies: also fit the held-out items and report the autoencoder's "
                             "reconstruction of training vs held-out fields (does it generalise?)")
    tune = parser.add_argument_group("code strategy: decoders tuned to NefGPT's draws (`Run.tune_decoders`)")
    tune.add_argument("--tune-decoders", action="store_true",
                      help="also tune a copy of the code VAE's decoders to NefGPT's draws (OUT/code/<--tuned-name>, a "
                           "generation folder) and score every draw through them too (rows code-<name>: the same "
                           "codes, other decoders)")
    tune.add_argument("--prior-codes", type=int, default=10_000, help="NefGPT draws the decoders are tuned to")
    tune.add_argument("--prior-temperature", type=float, default=None,
                      help="NefGPT's temperature for those draws (default: the first --temperature; top-k: the first "
                           "--top-k)")
    tune.add_argument("--tune-epochs", type=int, default=20, help="passes over the training fields")
    tune.add_argument("--cycle-weight", type=float, default=0.1, help="the cycle term's weight")
    tune.add_argument("--mmd-weight", type=float, default=1.0,
                      help="the realism term's weight: the MMD between the prior's decoded fields and the training "
                           "fields (0: the cycle term alone)")
    tune.add_argument("--tune-lr", type=float, default=1e-4)
    tune.add_argument("--tune-batch-size", type=int, default=16)
    tune.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning's batches and posterior draws")
    tune.add_argument("--tuned-name", default="tuned",
                      help="folder under OUT/code for the tuned generator (another name keeps several side by side)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help=f"small run: {QUICK}")
    return parser


def check_tuning_args(parser, args) -> None:
    """Refuse tuning options no tuning could take, before any stage runs."""
    if args.prior_codes < 1:
        parser.error(f"--prior-codes must be >= 1, got {args.prior_codes}")
    if args.tune_epochs < 1 or args.tune_batch_size < 1 or not args.tune_lr > 0:
        parser.error(f"--tune-epochs and --tune-batch-size must be >= 1 and --tune-lr > 0, got {args.tune_epochs}, "
                     f"{args.tune_batch_size} and {args.tune_lr}")
    if not args.cycle_weight >= 0 or not args.mmd_weight >= 0:
        parser.error(f"--cycle-weight and --mmd-weight must be >= 0, got {args.cycle_weight} and {args.mmd_weight}")


def decoder_tuning(args):
    """The `DecoderTuning` of parsed options, and its prior's ``(top_k, temperature)``."""
    from nef_transformers.experiment import DecoderTuning

    tuning = DecoderTuning(prior_codes=args.prior_codes, epochs=args.tune_epochs, cycle_weight=args.cycle_weight,
                           mmd_weight=args.mmd_weight, lr=args.tune_lr, batch_size=args.tune_batch_size,
                           seed=args.tune_seed)
    return tuning, args.top_k[0], args.prior_temperature or args.temperature[0]


def tuned_row_name(name: str) -> str:
    """The rows of a tuned generator: ``code-tuned`` for the default folder, else ``code-<name>``."""
    return "code-tuned" if name == "tuned" else f"code-{name}"


def run_config(args):
    """The `RunConfig` of parsed options (the cached stages of a folder are reused only under the same ones)."""
    from nef_transformers.experiment import RunConfig

    return RunConfig(source=args.source, num_items=args.num_items, hidden_size=args.hidden_size,
                     num_hidden_layers=args.num_layers, num_attention_heads=args.heads,
                     num_mixtures=args.num_mixtures, mixture_covariance=args.mixture_covariance,
                     dropout=args.dropout, chunk_noise=args.chunk_noise,
                     batch_size=args.batch_size, learning_rate=args.lr,
                     num_train_epochs=args.epochs, autoencoder_epochs=args.ae_epochs,
                     autoencoder_hidden_size=args.ae_hidden_size, autoencoder_layers=args.ae_layers,
                     autoencoder_latent_dim=args.ae_latent_dim, autoencoder_batch_size=args.ae_batch_size,
                     autoencoder_latent_noise=args.ae_latent_noise, autoencoder_encoder=args.ae_encoder,
                     code_dim=args.code_dim,
                     code_chunk_width=args.code_chunk_width, code_sigma2=args.code_sigma2,
                     code_steps=args.code_steps, code_draws=args.code_draws,
                     code_drop_inactive=args.code_drop_inactive,
                     keep_best_model=args.keep_best, eval_steps=args.eval_steps)


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.skip_baselines = args.skip_baselines or args.samples_only
    if args.code_mixture < 0:
        parser.error(f"--code-mixture must be >= 0 (0: no mixture-code rows), got {args.code_mixture}")
    if args.tune_decoders:
        if "code" not in args.strategies:
            parser.error(f"--tune-decoders tunes the code strategy's decoders: add code to --strategies (got "
                         f"{' '.join(args.strategies)})")
        check_tuning_args(parser, args)
    if args.quick:
        args.num_items = args.num_items or QUICK["num_items"]
        args.epochs, args.vq_steps = QUICK["epochs"], QUICK["vq_steps"]

    import torch

    from nef_transformers.experiment import (Run, decode_codes, figure_row, metrics_table, save_samples_figure,
                                             seed_means)

    if args.threads:
        torch.set_num_threads(args.threads)
    name = Path(str(args.source)).stem
    out = Path(args.out or f"runs/generation_quality_{name}{'_quick' if args.quick else ''}")
    config = run_config(args)
    run = Run(out, config, device=args.device)
    train_idx, test_idx = run.split()
    started = time.perf_counter()
    rows, timings, reconstructions = [], {}, []
    # a partial rerun writes beside the full table, not over it
    suffix = time.strftime("_%Y%m%d-%H%M%S") if args.skip_baselines else ""
    t0 = time.perf_counter()
    fields = run.fit()
    timings["fit"] = time.perf_counter() - t0
    print(f"{len(train_idx)} training fields, {len(test_idx)} held-out items", flush=True)
    if not args.skip_baselines:
        rows += run.baseline_rows(noise_scale=args.noise_scale)
    for strategy in args.strategies:
        t0 = time.perf_counter()
        run.config.strategy = strategy
        run.config.max_train_steps = args.vq_steps if strategy == "vq" else None
        run.config.num_train_epochs = args.code_epochs if strategy == "code" and args.code_epochs else args.epochs
        run.train(strategy, ["--per_device_train_batch_size", str(args.vq_batch_size)] if strategy == "vq" else ())
        timings[f"train_{strategy}"] = time.perf_counter() - t0
        if args.reconstruction and strategy in ("learned", "code"):
            if strategy == "code" and "learned" not in args.strategies:  # the autoencoder under the code VAE
                reconstructions.append(run.reconstruction_row("learned"))
            reconstructions.append(run.reconstruction_row(strategy))
        if strategy == "learned" and not args.samples_only:
            # the ceiling of the prior (training fields through the autoencoder), the trivial prior over the same
            # latents (one Gaussian) and jittered copies
            rows.append(run.autoencoder_row())
            rows.append(run.latent_gaussian_row())
            rows.append(run.latent_noisy_row(noise_scale=args.latent_noise_scale))
        if strategy == "code" and not args.samples_only:
            # the ceiling of a prior over the codes (and the autoencoder's, above it), the VAE's own prior N(0, I)
            if "learned" not in args.strategies:
                rows.append(run.autoencoder_row())
            rows += run.code_rows()
            if args.code_mixture:
                rows += [run.code_mixture_row(seed, args.code_mixture) for seed in args.sample_seeds]
        tuned = None  # the code strategy's decoders tuned to NefGPT's draws, when asked
        if strategy == "code" and args.tune_decoders:
            t0 = time.perf_counter()
            tuning, prior_top_k, prior_temperature = decoder_tuning(args)
            tuned = run.tuned_code_vae(run.tune_decoders(prior_top_k, prior_temperature, tuning, args.tuned_name))
            timings["tune_decoders"] = time.perf_counter() - t0
        drawn, first = {}, {}  # each generator's rows; the weights of each (generator, setting)'s first draw
        for top_k, temperature, seed in itertools.product(args.top_k, args.temperature, args.sample_seeds):
            t0 = time.perf_counter()
            weights, sequences = run.sample(strategy, top_k=top_k, temperature=temperature, seed=seed,
                                            return_sequences=True)
            sample_s = time.perf_counter() - t0
            setting = {"top_k": top_k, "temperature": temperature, "seed": seed, "sample_s": round(sample_s, 1)}
            generators = [(strategy, weights, run.sequence_latents(strategy, sequences))]
            if tuned is not None:  # the same codes through the tuned decoders: a paired comparison
                generators.append((tuned_row_name(args.tuned_name), *decode_codes(tuned, sequences)))
            for name, generated, latents in generators:
                row = run.evaluate_weights(generated, name, setting, latents=latents)
                rows.append(row)
                drawn.setdefault(name, []).append(row)
                if row["one_nna"] is not None:
                    first.setdefault((name, top_k, temperature), generated)
        for name, generator_rows in drawn.items():
            # the setting with the best mean 1-NNA, by its first draw (its best draw would flatter it)
            row = figure_row(generator_rows)
            if row is not None:
                setting = (row["top_k"], row["temperature"])
                mean = [r for r in seed_means(generator_rows) if (r["top_k"], r["temperature"]) == setting]
                title = (f"{name}, top-k {row['top_k']}, T {row['temperature']:g}, seed {row['seed']}: "
                         f"1-NNA {row['one_nna']:.1%}, COV {row['cov']:.1%}"
                         + (f" (mean of {len(mean[0]['seeds'])} draws: {mean[0]['one_nna']:.1%})" if mean else ""))
                save_samples_figure(run, first[(name, *setting)], out / f"samples_{name}{suffix}.png", title=title)

    rows += seed_means(rows)  # with --sample-seeds: each setting's mean over the draws, ± its standard error
    table = metrics_table(rows)
    if reconstructions:
        table += "\n\n" + reconstruction_table(reconstructions)
    quality = "psnr" if "psnr" in fields.column_names else "iou"
    header = (f"# Generation quality: {args.source}\n\n{len(train_idx)} training fields (mean {quality} "
              f"{sum(fields[quality]) / len(fields):.3f}), {len(test_idx)} held-out references; command: "
              f"`python benchmarks/generation_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
    (out / f"generation_quality{suffix}.md").write_text(header + table + "\n", encoding="utf-8")
    payload = {"source": str(args.source), "rows": rows, "reconstruction": reconstructions, "timings_s": timings,
               "total_s": time.perf_counter() - started}
    (out / f"generation_quality{suffix}.json").write_text(json.dumps(payload, indent=2, default=float),
                                                          encoding="utf-8")
    print("\n" + table + "\n")
    for row in rows:
        print(json.dumps({"bench": "generation_quality", "source": str(args.source), "strategy": row["strategy"],
                          "top_k": row.get("top_k"), "temperature": row.get("temperature"), "seed": row.get("seed"),
                          "mmd": row["mmd"], "cov": row["cov"], "one_nna": row["one_nna"], "fd": row["fd"],
                          "memorisation_ratio": row["memorisation_ratio"], "latent_nn_ratio": row["latent_nn_ratio"],
                          "recognised": row["recognised"],
                          "invalid": row["invalid"],
                          **({"seeds": row["seeds"], "one_nna_se": row["one_nna_se"]} if "seeds" in row else {})}))
    for row in reconstructions:
        print(json.dumps({"bench": "reconstruction", "source": str(args.source), **row}))
    return rows


def reconstruction_table(rows: list[dict]) -> str:
    """Markdown table of `Run.reconstruction_row` results."""
    lines = ["| autoencoder | measure | training fields | held-out fields | held-out: most alike training field |",
             "|---|---|---|---|---|"]
    for row in rows:
        digits = 3 if row["measure"] == "iou" else 2
        lines.append(f"| {row['strategy']} | {row['measure']} | {row['train']:.{digits}f} ({row['num_train']}) | "
                     f"{row['heldout']:.{digits}f} ({row['num_heldout']}) | {row['retrieval']:.{digits}f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
