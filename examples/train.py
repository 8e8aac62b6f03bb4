#!/usr/bin/env python
"""Train NefGPT on a tokenised weight dataset with 🤗 Accelerate (the code is `nef_transformers.training`).

    python examples/train.py --dataset runs/mnist/vq/dataset --tokenizer runs/mnist/vq/tokenizer --output_dir runs/mnist/nef_gpt
    accelerate launch examples/train.py --dataset ... --tokenizer ... --output_dir ...

See examples/README.md for several processes, GPUs, resuming and pushing to the Hub, and
``python examples/train.py --help`` for every option.
"""

from nef_transformers.training import build_parser, cli, main  # noqa: F401  (main: in-process runs and tests)

if __name__ == "__main__":
    cli()
