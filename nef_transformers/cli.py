"""`nef-transformers` command line: ``fit``, ``tokenize`` and ``quickstart``.

Imports are lazy so that ``--help`` answers at once (importing transformers/datasets costs seconds).

Examples::

    nef-transformers fit --source mnist --num-fields 1024 --out runs/mnist
    nef-transformers fit --source ../shared/data/shapes/modelnet10_chair_32.npz --num-fields 889 --out runs/chairs
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m nef_transformers.cli fit --source mnist --num-fields 5000 --out runs/mnist5k
    nef-transformers tokenize --nefs runs/mnist --strategy vq --out runs/mnist-vq
    nef-transformers quickstart --out runs/quickstart
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nef-transformers", description="Generate neural fields with transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit SIREN neural fields to images or shapes into a weight dataset",
                              description="Fit one SIREN per image or shape. Resumable: re-run the same command "
                                          "after an interruption and only missing shards are fitted.")
    fit.add_argument("--source", required=True,
                     help="mnist (embedded 5,000 digits), cifar10, microimagenet (hub), or a path: image .npz, "
                          "voxel-grid .npz, or a mesh folder (.obj/.off/.ply)")
    fit.add_argument("--num-fields", type=_positive_int, default=None,
                     help="how many fields to fit (a seeded random subset; default: the whole source)")
    fit.add_argument("--out", required=True, help="output folder (the weight dataset lands in OUT/dataset)")
    fit.add_argument("--steps", type=_positive_int, default=None, help="Adam steps per field")
    fit.add_argument("--lr", type=_positive_float, default=None, help="learning rate")
    fit.add_argument("--hidden-dim", type=_positive_int, default=None)
    fit.add_argument("--num-layers", type=_positive_int, default=None, help="linear layers, output included")
    fit.add_argument("--omega-0", type=_positive_float, default=None)
    fit.add_argument("--init", choices=("shared", "random"), default="shared", help="initialisation (default shared)")
    fit.add_argument("--batch-size", type=_positive_int, default=None, help="fields optimised together")
    fit.add_argument("--shard-size", type=_positive_int, default=1024, help="fields per resumable shard")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    fit.add_argument("--threads", type=_positive_int, default=None,
                     help="torch CPU threads (default: all cores; 1 per process under accelerate)")
    fit.add_argument("--from-hub", action="store_true", help="mnist: the full public data set instead of the embedded one")
    fit.set_defaults(handler=run_fit)

    from .tokenization.command import add_tokenize_command
    from .quickstart import add_arguments as add_quickstart_arguments

    add_tokenize_command(commands)
    quickstart = commands.add_parser(
        "quickstart", help="fit, tokenize, train NefGPT, sample and evaluate, end to end (the main job)",
        description="Fit fields to a source's training split, train the tokenizer and NefGPT, sample as many fields "
                    "as held-out items and evaluate them (MMD, COV, 1-NNA, Frechet) beside oracle rows. Re-running "
                    "reuses finished stages.")
    add_quickstart_arguments(quickstart)
    quickstart.set_defaults(handler=run_quickstart)
    return parser


def _device(requested: str | None) -> str:
    import torch

    if requested is not None:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {requested} asked for, but no CUDA device is available")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _distributed_state(device: str):
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def run_fit(args) -> int:
    import numpy as np
    import torch

    from .data.sources import default_fit_config, default_spec, load_source
    from .data.weights import fit_to_disk
    from .fields.spec import SirenSpec

    device = _device(args.device)
    state = _distributed_state(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if state is not None and device.startswith("cuda"):
        device = str(state.device)
    source = load_source(args.source, from_hub=args.from_hub)
    spec = default_spec(source)
    overrides = {"hidden_dim": args.hidden_dim, "num_layers": args.num_layers, "omega_0": args.omega_0}
    spec = SirenSpec.from_dict({**spec.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    config = default_fit_config(source, steps=args.steps, lr=args.lr, batch_size=args.batch_size, init=args.init,
                                seed=args.seed)
    dataset = fit_to_disk(
        source, args.out, spec=spec, config=config, num_fields=args.num_fields, shard_size=args.shard_size,
        device=device,
        process_index=state.process_index if state else 0,
        num_processes=state.num_processes if state else 1,
        wait_for_everyone=state.wait_for_everyone if state else None,
    )
    if state is None or state.is_main_process:
        if source.kind == "image":
            from .data.metadata import weights_tensor
            from .fields.preview import save_image_preview

            first = dataset.select(range(min(16, len(dataset))))
            preview = save_image_preview(source, spec, weights_tensor(first), first["index"],
                                         os.path.join(args.out, "preview.png"))
            print(f"preview of the first fields beside their images: {preview}")
        quality = "psnr" if "psnr" in dataset.column_names else "iou"
        values = np.asarray(dataset[quality])
        unit = " dB" if quality == "psnr" else ""
        print(f"{len(dataset)} fields of {spec} in {os.path.join(args.out, 'dataset')}: "
              f"mean {quality} {values.mean():.3f}{unit} (min {values.min():.3f}{unit})"
              + (f" [{state.num_processes} processes]" if state else ""))
    return 0


def run_quickstart(args) -> int:
    from .quickstart import run_quickstart as run

    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        # Errors for people: one line that says what and where, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
