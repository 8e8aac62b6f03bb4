"""``nef-transformers tokenize``: the command-line face of `train.train_tokenizer`.

The parser needs nothing heavy; the handler imports torch, datasets and the tokenizers when it runs.

    nef-transformers tokenize --nefs runs/mnist --strategy vq --out runs/mnist-vq
    nef-transformers tokenize --nefs runs/mnist --strategy naive --out runs/mnist-chunks
    nef-transformers tokenize --nefs runs/mnist --strategy learned --epochs 30 --out runs/mnist-learned
    nef-transformers tokenize --nefs runs/mnist --strategy code --epochs 30 --out runs/mnist-code
"""

from __future__ import annotations

from pathlib import Path

from ..cli import _positive_int

STRATEGIES = ("vq", "naive", "learned", "code")


def add_tokenize_command(subparsers) -> None:
    """Add ``tokenize`` to the ``nef-transformers`` command line (the subparsers of ``cli.build_parser``)."""
    parser = subparsers.add_parser(
        "tokenize", help="train a tokenization of a weight dataset and tokenise it",
        description="Train a tokenization on a weight dataset and write OUT/tokenizer (vq: NefVQTokenizer, loads with "
                    "AutoTokenizer; naive: NeuronChunker; learned: NefAutoencoder; code: NefCodeVAE over a "
                    "NefAutoencoder trained first), OUT/dataset (the tokenised "
                    "fields: input_ids or chunks) and OUT/tokenize.json (settings and statistics).")
    parser.add_argument("--nefs", required=True,
                        help="weight dataset: a `nef-transformers fit` folder or any folder load_nef_dataset reads")
    parser.add_argument("--strategy", choices=STRATEGIES, default="vq", help="default: vq")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--chunking", choices=("neuron", "scalar"), default=None,
                        help="per-neuron or per-scalar chunks (default: vq scalar, naive neuron)")
    parser.add_argument("--levels", type=_positive_int, nargs="+", default=None,
                        help="vq: residual levels (tokens per chunk), one value or one per layer (default 1)")
    parser.add_argument("--codebook-size", type=_positive_int, default=None, help="vq: codes per codebook (default 1024)")
    parser.add_argument("--codebook-grouping", choices=("shared", "by_width", "per_layer"), default=None,
                        help="vq: which chunks share a codebook (default shared)")
    parser.add_argument("--canonical", choices=("none", "align", "sort"), default=None,
                        help="vq: hidden-unit canonical form before chunking (default none: rely on the shared init)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="vq: EMA epochs (default 1); learned, code: autoencoder epochs (default 30)")
    parser.add_argument("--latent-dim", type=_positive_int, default=4, help="learned, code: latent width per neuron")
    parser.add_argument("--encoder", choices=("weights", "function"), default="function",
                        help="learned, code: what the autoencoder's encoder reads: the field's outputs on a lattice "
                             "(default; a CNN, generalises better to new fields) or the neurons' weights")
    parser.add_argument("--code-dim", type=_positive_int, default=32, help="code: numbers per field's code")
    parser.add_argument("--code-chunk-width", type=_positive_int, default=4,
                        help="code: numbers per NefGPT position (must divide --code-dim)")
    parser.add_argument("--code-steps", type=_positive_int, default=4000, help="code: VAE optimizer steps")
    parser.add_argument("--code-draws", type=int, default=8,
                        help="code: posterior draws per field in the tokenised set (0: the means)")
    parser.add_argument("--code-drop-inactive", action="store_true",
                        help="code: NefGPT's codes hold only the dimensions in use (the rest decode at 0)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run_tokenize)


def run_tokenize(args) -> int:
    """Handler of ``nef-transformers tokenize``; prints one summary line."""
    import torch

    from ..data.weights import load_nef_dataset
    from .train import VQTokenizerConfig, train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} is not empty; choose a new --out")
    dataset = load_nef_dataset(args.nefs)
    kwargs: dict = {}
    if args.strategy == "vq":
        levels = None if args.levels is None else (args.levels[0] if len(args.levels) == 1 else tuple(args.levels))
        overrides = {"chunking": args.chunking, "codebook_size": args.codebook_size, "levels": levels,
                     "codebook_grouping": args.codebook_grouping, "canonical": args.canonical, "epochs": args.epochs,
                     "seed": args.seed}
        kwargs["vq_config"] = VQTokenizerConfig(**{k: v for k, v in overrides.items() if v is not None})
    elif args.strategy == "naive":
        kwargs["chunking"] = args.chunking or "neuron"
    else:
        from ..data.metadata import get_source_info, get_spec
        from .learned import NefAutoencoderConfig
        from .train import autoencoder_defaults

        loss = autoencoder_defaults(get_source_info(dataset).get("kind"))["function_loss"]
        kwargs["autoencoder_config"] = NefAutoencoderConfig(spec=get_spec(dataset).to_dict(), latent_dim=args.latent_dim,
                                                            function_loss=loss, encoder=args.encoder)
        kwargs["autoencoder_epochs"] = args.epochs or 30
        if args.strategy == "code":
            from .code import NefCodeConfig

            kwargs["code_config"] = NefCodeConfig(code_dim=args.code_dim, chunk_width=args.code_chunk_width,
                                                  steps=args.code_steps, draws=args.code_draws,
                                                  drop_inactive=args.code_drop_inactive, seed=args.seed)
    result = train_tokenizer(dataset, args.strategy, out_dir=out, **kwargs)
    info = result.info
    line = f"{info['num_fields']} fields tokenised ({args.strategy}): {info['tokens_per_field']} tokens per field"
    if args.strategy == "vq":
        line += f", vocabulary {info['vocab_size']}, {100 * info['codes_in_use']:.1f}% of codes in use"
    print(f"{line} -> {out / 'tokenizer'}, {out / 'dataset'}")
    return 0


__all__ = ["add_tokenize_command", "run_tokenize"]
