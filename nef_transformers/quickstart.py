"""The main job: ``nef-transformers quickstart`` (and ``python examples/quickstart.py``).

From nothing to generated fields with honest numbers: fit SIREN fields to the training split of a source (the
embedded MNIST digits by default; or a voxel-grid ``.npz`` / mesh folder), train the tokenization and NefGPT,
sample as many fields as there are held-out items, and evaluate them against the held-out items beside oracle
and baseline generators. Writes into ``--out``::

    samples.png        generated fields beside real held-out items
    metrics.md/.json   MMD, COV, 1-NNA, Fréchet distance, memorisation ratio, with the oracle / baseline rows
    loss_curves.png    fitting loss and NefGPT training / validation loss
    model/             the trained NefGPT: pipeline("neural-field-generation", model=OUT/model) loads it (with
                       ``--strategy code --tune-decoders``: with the decoders tuned to its draws, `Run.tune_decoders`)
    meshes/            (3D sources) the generated shapes as .ply
    run.json, fields/, reference/, {strategy}/   the stages' outputs (`nef_transformers.experiment`)

Re-running the same command reuses finished stages (fitted fields, tokenizer, model, samples) and resumes an
interrupted training; ``--fresh`` starts over. A folder holding another run (other source or split) is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Sampling defaults of the quickstart (benchmarks/generation_quality.py compares the grid). With 4-wide latents
# T 0.8 beat 0.5 on MMD, COV and 1-NNA (with 16-wide ones it was the other way round; benchmarks/RESULTS.md).
DEFAULT_TOP_K = 3
DEFAULT_TEMPERATURE = 0.8
ENCODER_CHOICES = ("weights", "function")  # nef_transformers.tokenization.learned.ENCODERS (a test keeps them equal)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .cli import _positive_float, _positive_int

    parser.add_argument("--source", default="mnist",
                        help="mnist (embedded 5,000 digits, default), a voxel-grid .npz, an image .npz or a mesh folder")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--strategy", choices=("naive", "vq", "learned", "code"), default="learned",
                        help="weight tokenization (default learned: neuron-autoencoder latents, the best generator in "
                             "benchmarks/generation_quality.py; code: a VAE's short code over those latents, whose "
                             "NefGPT epochs run over 8 posterior draws per field, 8x the steps; naive: continuous "
                             "per-neuron chunks; vq: one token per weight, ~18x longer sequences)")
    parser.add_argument("--num-items", type=_positive_int, default=None,
                        help="use a seeded subset of the source (default: all of it), split 80/20")
    parser.add_argument("--fit-steps", type=_positive_int, default=None, help="Adam steps per field (default: per source)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="NefGPT training epochs")
    parser.add_argument("--max-train-steps", type=_positive_int, default=None, help="cap on NefGPT optimizer steps")
    parser.add_argument("--latent-dim", type=_positive_int, default=4,
                        help="learned strategy: latent width per neuron (default 4: narrow latents are easier to model)")
    parser.add_argument("--ae-hidden-size", type=_positive_int, default=64,
                        help="learned strategy: autoencoder width (default 64; 32 with --ae-layers 1 is ~1.5 min "
                             "faster and scores worse: benchmarks/RESULTS.md)")
    parser.add_argument("--ae-layers", type=_positive_int, default=2, help="learned strategy: autoencoder layers")
    parser.add_argument("--ae-encoder", choices=ENCODER_CHOICES, default="function",
                        help="learned / code strategies: what the autoencoder's encoder reads (default function: "
                             "the field evaluated on a lattice, which generalises to held-out items and scores better "
                             "here: benchmarks/RESULTS.md; weights: the per-neuron weights, the earlier default: pass "
                             "it to resume a folder trained with it)")
    parser.add_argument("--tune-decoders", action="store_true",
                        help="code strategy: tune a copy of the code VAE's decoders to NefGPT's own draws (at --top-k "
                             "and --temperature) before sampling, and write that generator as OUT/model "
                             "(`Run.tune_decoders`: on the chairs 1-NNA 70.1 -> 66.2 %%, on MNIST no change: "
                             "benchmarks/RESULTS.md sessions 17-18)")
    parser.add_argument("--hidden-size", type=_positive_int, default=128)
    parser.add_argument("--num-layers", type=_positive_int, default=4)
    parser.add_argument("--top-k", type=_positive_int, default=DEFAULT_TOP_K)
    parser.add_argument("--temperature", type=_positive_float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--fresh", action="store_true", help="delete a previous run in --out and start over")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# Training length by source: the MNIST default fits the 15-minute budget on 2 CPU cores.
DEFAULT_EPOCHS = {"image": 8, "occupancy": 60}
AUTOENCODER_EPOCHS = 15  # the autoencoder's loss is within 4 % of its 30-epoch value (benchmarks/RESULTS.md)


def run_quickstart(args) -> dict:
    if args.source not in ("cifar10", "microimagenet"):
        # everything is local (embedded MNIST, files, folders): never wait on hub retries without a network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .experiment import Run, RunConfig, decode_codes, metrics_table, save_loss_figure, save_samples_figure

    if args.tune_decoders and args.strategy != "code":
        raise ValueError(f"--tune-decoders tunes the code strategy's decoders: pass --strategy code (got "
                         f"{args.strategy})")
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available")
    config = RunConfig(source=args.source, num_items=args.num_items, fit_steps=args.fit_steps,
                       strategy=args.strategy, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                       num_attention_heads=4 if args.hidden_size % 4 == 0 else 1,
                       num_train_epochs=args.epochs or 1, max_train_steps=args.max_train_steps, seed=args.seed,
                       autoencoder_epochs=min(AUTOENCODER_EPOCHS, args.epochs or AUTOENCODER_EPOCHS),
                       autoencoder_latent_dim=args.latent_dim, autoencoder_hidden_size=args.ae_hidden_size,
                       autoencoder_layers=args.ae_layers, autoencoder_encoder=args.ae_encoder)
    run = Run(Path(args.out), config, device=device, fresh=args.fresh)
    if args.epochs is None:
        run.config.num_train_epochs = DEFAULT_EPOCHS.get(run.source.kind, 30)
    out = run.out
    train_idx, test_idx = run.split()
    print(f"[quickstart] {run.state} run in {out}: source {args.source} ({len(train_idx)} training / {len(test_idx)} "
          f"held-out items), strategy {args.strategy}, device {run.device}")

    timings = {}
    names = ["fit fields", "tokenize", "train NefGPT", *(["tune decoders"] if args.tune_decoders else []), "sample",
             "evaluate"]

    def stage(name, function):
        name = f"{names.index(name) + 1}/{len(names)} {name}"
        print(f"[quickstart] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = function()
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    dataset = stage("fit fields", run.fit)
    quality = "psnr" if "psnr" in dataset.column_names else "iou"
    stage("tokenize", run.tokenize)
    model_dir = stage("train NefGPT", run.train)
    generator = f"nef_gpt-{args.strategy}"
    if args.tune_decoders:  # the generator is then the tuned folder: the same NefGPT, the tuned decoders
        model_dir = stage("tune decoders", lambda: run.tune_decoders(args.top_k, args.temperature))
        generator += "-tuned"

    def sample():
        weights, sequences = run.sample(top_k=args.top_k, temperature=args.temperature, seed=args.seed,
                                        return_sequences=True)
        if args.tune_decoders:  # NefGPT's codes through the tuned decoders
            return decode_codes(run.tuned_code_vae(model_dir), sequences)
        # the learned and code strategies sample (or decode to) latents: how near the training fields' they are
        return weights, run.sequence_latents(args.strategy, sequences)

    weights, latents = stage("sample", sample)

    def evaluate():
        row = run.evaluate_weights(weights, generator, {"top_k": args.top_k, "temperature": args.temperature},
                                   latents=latents)
        return [row, *run.baseline_rows(seed=args.seed)]

    rows = stage("evaluate", evaluate)

    # outputs a person looks at
    final_model = out / "model"
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    shutil.rmtree(final_model, ignore_errors=True)
    os.replace(tmp, final_model)
    tuned = ", tuned decoders" if args.tune_decoders else ""
    samples_png = save_samples_figure(
        run, weights, out / "samples.png",
        title=f"NefGPT ({args.strategy}{tuned}, top-k {args.top_k}, T {args.temperature:g})")
    loss_png = save_loss_figure(run, args.strategy, out / "loss_curves.png")
    meshes = None
    if run.kind == "points":
        meshes = write_meshes(run, weights[:32], out / "meshes")
    table = metrics_table(rows)
    options = (f" --strategy {args.strategy}" if args.strategy != "learned" else "") + (
        " --tune-decoders" if args.tune_decoders else "")
    mean_quality = float(sum(dataset[quality]) / len(dataset))
    (out / "metrics.md").write_text(
        f"# Quickstart metrics\n\nSource `{args.source}`: {len(train_idx)} training items fitted (mean {quality} "
        f"{mean_quality:.3f}), {len(test_idx)} held-out items as references. Generator: NefGPT on `{args.strategy}` "
        f"tokens{tuned}, top-k {args.top_k}, temperature {args.temperature:g}. Oracle and baselines: `oracle-train` "
        f"(training fields as samples: the ceiling), `noisy-train` (training weights + noise), `gaussian` (a "
        f"Gaussian fitted in weight space).\n\n{table}\n\nMMD in the distance's units (mean squared pixel "
        f"difference, or Chamfer); COV and 1-NNA as HyperDiffusion (1-NNA 50% is ideal); memorisation ratio = "
        f"median nearest-training distance of samples / of held-out real items (≥ 0.9: not copies); latent NN ratio "
        f"(learned strategy) = the same for the sampled latents against the training fields' latents, the training "
        f"set leave-one-out as the reference (about 1: as new as real data; far below 1: copies). Command: "
        f"`nef-transformers quickstart --source {args.source} --out {args.out}{options}`.\n", encoding="utf-8")
    summary = {"out": str(out), "rows": rows, "timings_s": timings, "total_s": round(time.perf_counter() - started, 1),
               "model": str(final_model), "samples_png": str(samples_png), "loss_curves_png": str(loss_png),
               "meshes": str(meshes) if meshes else None, f"mean_{quality}": mean_quality}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    print("\n" + table + "\n")
    stages = ", ".join(f"{name.split(' ', 1)[1]} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"[quickstart] done in {summary['total_s']:.0f} s ({stages})")
    print(f"  samples beside real items: {samples_png}")
    print(f"  metrics:                   {out / 'metrics.md'}")
    print(f"  loss curves:               {loss_png}")
    if meshes:
        print(f"  generated meshes (.ply):   {meshes}")
    print(f"  model:                     {final_model}  ->  pipeline('neural-field-generation', model='{final_model}')")
    return summary


def write_meshes(run, weights, folder: Path) -> Path:
    """Generated shapes as .ply files (``sample_000.ply`` ...); empty fields are skipped and counted."""
    from .data.metadata import get_spec
    from .experiment import MESH_RESOLUTION
    from .fields.render import render_meshes

    folder.mkdir(exist_ok=True)
    meshes = render_meshes(get_spec(run.fit()), weights.float().to(run.device), MESH_RESOLUTION)
    empty = 0
    for i, mesh in enumerate(meshes):
        if mesh is None:
            empty += 1
            continue
        mesh.export(folder / f"sample_{i:03d}.ply")
    if empty:
        logger.warning("%d of %d generated shapes are empty and were not written", empty, len(meshes))
    return folder


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = add_arguments(argparse.ArgumentParser(prog="quickstart", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_quickstart(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
