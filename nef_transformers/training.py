"""Train NefGPT on a tokenised weight dataset with 🤗 Accelerate: the code behind ``examples/train.py`` (and the
quickstart's training stage, which calls `main` in-process).

Run from the repository root. One process (CPU, or one GPU when there is one)::

    python examples/train.py --dataset runs/mnist/vq/dataset --tokenizer runs/mnist/vq/tokenizer --output_dir runs/mnist/nef_gpt

The same under the launcher (reads your ``accelerate config``)::

    accelerate launch examples/train.py --dataset runs/mnist/vq/dataset --tokenizer runs/mnist/vq/tokenizer \\
        --output_dir runs/mnist/nef_gpt

Two CPU processes (gloo; ``--cpu --num_processes 2`` alone would start ONE process, see ../shared/HF_NOTES.md)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/train.py --cpu --dataset runs/mnist/vq/dataset --tokenizer runs/mnist/vq/tokenizer --output_dir runs/mnist/nef_gpt

Several GPUs in bf16::

    accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 examples/train.py \\
        --dataset runs/mnist/vq/dataset --tokenizer runs/mnist/vq/tokenizer --output_dir runs/mnist/nef_gpt

Resume an interrupted run: the same command plus ``--resume_from_checkpoint latest`` (or a checkpoint folder).
Continuous chunks (naive / learned-embedding strategies): a dataset with a ``chunks`` column trains
`NefGPTForWeightRegression` instead (``--head auto`` picks it). ``--push_to_hub user/name`` uploads the final
folder with the model card rendered from ``hub_cards/nef_gpt_model_card.md`` (or ``--model_card_template``, e.g.
``hub_cards/mnist-vq.md``). The card holds metric values only when ``--card_metrics`` names a measurement (the
``metrics.json`` of ``nef-transformers quickstart``): its generator row fills the model-index, beside the oracle row::

    accelerate launch examples/train.py --dataset runs/mnist-vq/tokens/dataset \\
        --tokenizer runs/mnist-vq/tokens/tokenizer --output_dir runs/mnist-vq/model --push_to_hub nefgen/mnist-vq \\
        --model_card_template hub_cards/mnist-vq.md --card_metrics runs/mnist-vq/eval/metrics.json

Input: ``--dataset`` is a ``datasets`` ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` with
``train`` and ``validation``/``test``) with an ``input_ids`` column (fixed-length VQ ids) or a ``chunks``
column (``(t, w)`` floats per field), plus ``label`` for ``--class_conditional``. ``--tokenizer`` is the folder
of the tokenization that made it (``nef-transformers tokenize``'s ``OUT/tokenizer``): it fixes the vocabulary,
the special ids and the structural positions, and is saved with the model.

Output (``--output_dir``): ``config.json``, ``model.safetensors``, ``generation_config.json``, the VQ tokenizer
files (a chunker or autoencoder goes to ``tokenizer/``), ``README.md`` (the model card), ``trainer_state.json``
(log history, world size); ``checkpoints/step_N/`` (``save_state``) and ``logs/`` (TensorBoard, when installed)
are not pushed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .card_templates import read_card_template
from .models.nef_gpt.configuration_nef_gpt import MIXTURE_COVARIANCES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CARD_TEMPLATE = REPO_ROOT / "hub_cards" / "nef_gpt_model_card.md"
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "nef_training_state.json"  # written last: a checkpoint without it is incomplete and ignored
BEST_DIR, BEST_WEIGHTS, BEST_STATE = "best", "model.safetensors", "best.json"  # --keep_best_model
HEADS = ("auto", "causal_lm", "regression")
LOCAL_ONLY = ("checkpoints", "logs")  # sub-folders of --output_dir that are never pushed
# Arguments that change the optimisation trajectory: resuming with other values is refused.
TRAJECTORY_ARGS = ("head", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                   "weight_decay", "adam_beta1", "adam_beta2", "lr_warmup_steps", "max_grad_norm", "seed",
                   "validation_split", "class_conditional", "chunk_noise", "mixup_neighbours", "mixup_max")
# what a checkpoint written before an option existed was trained with
TRAJECTORY_DEFAULTS = {"chunk_noise": 0.0, "mixup_neighbours": 0, "mixup_max": 0.5}

logger = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------ arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="save_to_disk folder with input_ids or chunks")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer folder (AutoTokenizer); required for input_ids, optional for chunks")
    data.add_argument("--output_dir", required=True)
    data.add_argument("--validation_split", type=_fraction, default=0.1,
                      help="share held out for validation when the dataset has no validation/test split")
    data.add_argument("--class_conditional", action="store_true", help="condition on the dataset's label column")

    model = parser.add_argument_group("model (see NefGPTConfig)")
    model.add_argument("--head", choices=HEADS, default="auto",
                       help="causal_lm for input_ids, regression for chunks; auto picks from the columns")
    model.add_argument("--hidden_size", type=_positive_int, default=128)
    model.add_argument("--num_hidden_layers", type=_positive_int, default=4)
    model.add_argument("--num_attention_heads", type=_positive_int, default=4)
    model.add_argument("--num_key_value_heads", type=_positive_int, default=1)
    model.add_argument("--dropout", type=_fraction, default=0.0, help="hidden and attention dropout")
    model.add_argument("--num_mixtures", type=_positive_int, default=8, help="regression head only")
    model.add_argument("--mixture_covariance", choices=MIXTURE_COVARIANCES, default="diagonal",
                       help="regression head only: each mixture component's covariance over a chunk (full: a "
                            "Cholesky factor, w(w+1)/2 numbers per component; for short chunks)")
    model.add_argument("--chunk_noise", type=_non_negative_float, default=0.0,
                       help="regression head only: Gaussian noise added to the training chunks each step, this many "
                            "times each (position, entry)'s std over the training set (data augmentation for a few "
                            "hundred fields); validation sees the chunks as they are")
    model.add_argument("--mixup_neighbours", type=_non_negative_int, default=0,
                       help="regression head only: each training step replaces every sequence by a random point "
                            "between it and one of its K nearest training sequences (L2 over the chunks; within its "
                            "class with --class_conditional); 0: off")
    model.add_argument("--mixup_max", type=_fraction, default=0.5,
                       help="with --mixup_neighbours: the neighbour's share is drawn uniformly from [0, this]")

    train = parser.add_argument_group("optimisation")
    train.add_argument("--per_device_train_batch_size", type=_positive_int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=_positive_int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    train.add_argument("--learning_rate", type=_positive_float, default=5e-4)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--max_grad_norm", type=_positive_float, default=1.0)
    train.add_argument("--num_train_epochs", type=_positive_int, default=10)
    train.add_argument("--max_train_steps", type=_positive_int, default=None,
                       help="optimizer steps in total; overrides --num_train_epochs")
    train.add_argument("--lr_warmup_steps", type=_non_negative_int, default=100,
                       help="linear warm-up steps, then cosine decay to 0")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: what accelerate launch / accelerate config says")
    train.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    train.add_argument("--num_threads", type=_positive_int, default=None,
                       help="torch threads per process on CPU (default 1: faster for small models on few cores)")
    train.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("checkpoints, logging, hub")
    run.add_argument("--checkpointing_steps", type=_positive_int, default=500, help="save_state every N steps")
    run.add_argument("--checkpoints_total_limit", type=_positive_int, default=2, help="keep the newest N checkpoints")
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    run.add_argument("--stop_after_steps", type=_positive_int, default=None,
                     help="checkpoint and stop once this many steps are done (e.g. a job time limit); "
                          "continue later with --resume_from_checkpoint latest")
    run.add_argument("--eval_steps", type=_positive_int, default=500, help="validation loss every N steps (and at the end)")
    run.add_argument("--keep_best_model", action="store_true",
                     help="save the weights of the lowest validation loss (OUTPUT_DIR/best/) and make them the final "
                          "model, as transformers.Trainer's load_best_model_at_end: small weight datasets overfit")
    run.add_argument("--logging_steps", type=_positive_int, default=50)
    run.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto",
                     help="auto: TensorBoard when installed")
    run.add_argument("--push_to_hub", default=None, metavar="REPO", help="push the final folder to this hub repo")
    run.add_argument("--hub_private", action="store_true")
    run.add_argument("--model_card_template", default=str(DEFAULT_CARD_TEMPLATE),
                     help="Jinja card template (hub_cards/: nef_gpt_model_card.md, mnist-vq.md, shapenet-vq.md)")
    run.add_argument("--card_metrics", default=None, metavar="PATH",
                     help="metrics.json of `nef-transformers quickstart` or generation_quality.json of "
                          "benchmarks/generation_quality.py: its generator row fills the card's model-index; "
                          "without it the card has no metric values")
    return parser


# ------------------------------------------------------------------------------------------------------ data
def _untied(state: dict) -> dict:
    """A state dict for safetensors: one entry per shared storage (tied embeddings), on the CPU."""
    seen, kept = set(), {}
    for key, value in state.items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        kept[key] = value.detach().cpu().contiguous()
    return kept


def load_splits(path: str, validation_split: float, seed: int):
    """``(train, validation)`` `datasets.Dataset`s from a save_to_disk folder (split off when absent: a random
    ``validation_split`` share of the rows, or of the fields when an ``index`` column repeats, all rows of a held-out
    field going to validation)."""
    from datasets import DatasetDict, load_from_disk

    if not Path(path).exists():
        raise FileNotFoundError(f"--dataset {path} does not exist (expected a datasets.save_to_disk folder)")
    try:
        dataset = load_from_disk(path)
    except Exception as error:
        raise ValueError(f"--dataset {path} is not a readable datasets.save_to_disk folder: {error}") from error
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"--dataset {path} has splits {list(dataset)} but no 'train'")
        validation = next((dataset[name] for name in ("validation", "test") if name in dataset), None)
        train = dataset["train"]
    else:
        train, validation = dataset, None
    if validation is None:
        if validation_split == 0 or len(train) < 2:
            return train, None
        if "index" in train.column_names:  # several rows of one field (the code strategy's posterior draws): split
            import numpy as np  # by field, so that no validation field has rows in training

            index = np.asarray(train["index"])
            fields = np.unique(index)
            if len(fields) < len(index):
                if len(fields) < 2:
                    return train, None
                chosen = np.random.default_rng(seed).permutation(fields)[:max(1, round(validation_split * len(fields)))]
                held = np.isin(index, chosen)
                return train.select(np.flatnonzero(~held)), train.select(np.flatnonzero(held))
        num_val = max(1, round(validation_split * len(train)))
        parts = train.train_test_split(test_size=num_val, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    return train, validation


def to_tensors(dataset, column: str, class_conditional: bool):
    """Materialise once into tensors (>10x less loader overhead than a DataLoader over the dataset)."""
    import torch

    if column not in dataset.column_names:
        raise ValueError(f"the dataset has columns {dataset.column_names}; expected '{column}'")
    columns = [column] + (["label"] if class_conditional else [])
    if class_conditional and "label" not in dataset.column_names:
        raise ValueError("--class_conditional needs a 'label' column in the dataset")
    table = dataset.with_format("torch", columns=columns)[:]
    values = table[column]
    if isinstance(values, list):
        raise ValueError(f"column '{column}' has rows of different lengths; NefGPT needs fixed-length sequences")
    values = values.long() if column == "input_ids" else values.float()
    expected_ndim = 2 if column == "input_ids" else 3
    if values.ndim != expected_ndim:
        raise ValueError(f"column '{column}' has shape {tuple(values.shape)}; expected {expected_ndim} dimensions")
    labels = table["label"].long() if class_conditional else None
    return values, labels


def nearest_neighbours(values, labels, k: int, block: int = 1024):
    """Each sequence's `k` nearest other sequences (L2 over the flattened values), within its own class when
    `labels` is given: a (len(values), k) index tensor, nearest first."""
    import torch

    flat = values.reshape(len(values), -1).float()
    if labels is not None:
        classes, counts = labels.unique(return_counts=True)
        if counts.min() <= k:
            small = classes[counts.argmin()].item()
            raise ValueError(f"--mixup_neighbours {k}: class {small} has only {counts.min().item()} training "
                             f"sequences; every class needs more than {k}")
    elif len(flat) <= k:
        raise ValueError(f"--mixup_neighbours {k} needs more than {k} training sequences, got {len(flat)}")
    found = []
    for start in range(0, len(flat), block):
        dist = torch.cdist(flat[start:start + block], flat)
        rows = torch.arange(start, min(start + block, len(flat)))
        dist[rows - start, rows] = float("inf")  # not its own neighbour
        if labels is not None:
            dist[labels[rows, None] != labels[None, :]] = float("inf")
        found.append(dist.topk(k, dim=1, largest=False).indices)
    return torch.cat(found)


def mix_with_neighbours(values, index, train_values, neighbours, mixup_max: float):
    """`values` (the training sequences `index`) moved towards one random neighbour each by a share drawn
    uniformly from [0, mixup_max] (torch's global generator, like the chunk noise)."""
    import torch

    pick = neighbours[index, torch.randint(neighbours.shape[1], (len(index),), device=neighbours.device)]
    share = torch.rand(len(index), *([1] * (values.ndim - 1)), device=values.device) * mixup_max
    return values + share * (train_values[pick] - values)


def detect_head(dataset, head: str) -> str:
    if head != "auto":
        return head
    if "input_ids" in dataset.column_names:
        return "causal_lm"
    if "chunks" in dataset.column_names:
        return "regression"
    raise ValueError(f"the dataset has columns {dataset.column_names}: need input_ids (VQ ids) or chunks (continuous)")


# ------------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | None):
    """The tokenization the dataset was made with, from the folder `nef-transformers tokenize` wrote (OUT/tokenizer):
    a `NeuronChunker` (naive), a `NefAutoencoder` (learned), a `NefCodeVAE` (code) or, for VQ ids, any
    `AutoTokenizer` folder."""
    if path is None:
        return None
    import nef_transformers  # noqa: F401  (registers the AutoClasses)
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--tokenizer {path} is not a folder")
    try:
        if (folder / "chunker_config.json").is_file():
            from nef_transformers.tokenization import NeuronChunker

            return NeuronChunker.from_pretrained(folder)
        config_file = folder / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type == "nef_autoencoder":
            from nef_transformers.tokenization import NefAutoencoder

            return NefAutoencoder.from_pretrained(folder)
        if model_type == "nef_code_vae":
            from nef_transformers.tokenization import NefCodeVAE

            return NefCodeVAE.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ValueError(f"could not load the tokenizer in {path} ({type(error).__name__}: {error})") from error


def is_vocabulary_tokenizer(tokenizer) -> bool:
    return hasattr(tokenizer, "bos_token_id") and hasattr(tokenizer, "__len__")


def token_id_ranges(tokenizer) -> list[list[int]] | None:
    """`[start, end)` of the ids allowed at each position: the tokenizer's `token_id_ranges()` when it has one,
    else NefVQTokenizer's per-code `code_offset` and `codebook_size` (one id range per codebook and level)."""
    if hasattr(tokenizer, "token_id_ranges"):
        return [[int(start), int(end)] for start, end in tokenizer.token_id_ranges()]
    offsets, size = getattr(tokenizer, "code_offset", None), getattr(tokenizer, "codebook_size", None)
    if offsets is None or size is None:
        return None
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[bos, bos + 1]] + [[int(offset), int(offset) + int(size)] for offset in offsets] + [[eos, eos + 1]]


def sequence_layout(tokenizer, head: str, chunk_dim: int | None = None) -> dict:
    """The structural lists of `NefGPTConfig` from a tokenization (duck-typed), ids counted from 1:
    `structure_ids()` of a VQ tokenizer (0 at BOS/EOS); for continuous chunks the chunker's `layer_ids`,
    `neuron_ids` and, when the dataset holds the chunks themselves (not latents), their real `widths`."""
    if tokenizer is None:
        return {}
    if head == "causal_lm":
        if not hasattr(tokenizer, "structure_ids"):
            logger.info("the tokenizer has no structure_ids(): training without structural embeddings")
            return {}
        ids = tokenizer.structure_ids()
        layout = {f"token_{key}": [int(v) for v in ids[key]] for key in ("layer_ids", "neuron_ids", "level_ids")
                  if key in ids}
        ranges = token_id_ranges(tokenizer)
        if ranges is not None:
            layout["token_id_ranges"] = ranges
        return layout
    chunker = getattr(tokenizer, "chunker", tokenizer)
    if not hasattr(chunker, "layer_ids"):
        return {}
    layout = {"token_layer_ids": [int(v) + 1 for v in chunker.layer_ids],
              "token_neuron_ids": [int(v) + 1 for v in chunker.neuron_ids]}
    if chunker is tokenizer and hasattr(chunker, "widths") and chunk_dim == int(chunker.mask.shape[1]):
        layout["token_chunk_widths"] = [int(v) for v in chunker.widths]
    return layout


def field_info(dataset, tokenizer) -> dict:
    """``field_spec`` / ``field_source`` for the config: from the dataset's nef metadata (which `nef-transformers
    tokenize` keeps), else the spec from the tokenizer; lets the pipeline rebuild and render samples."""
    from nef_transformers.data.metadata import get_source_info, get_spec

    try:
        return {"field_spec": get_spec(dataset).to_dict(), "field_source": get_source_info(dataset)}
    except ValueError:
        pass
    for holder in (tokenizer, getattr(tokenizer, "chunker", None)):
        spec = getattr(holder, "siren_spec", None) or getattr(holder, "spec", None)
        if spec is not None and hasattr(spec, "to_dict"):
            return {"field_spec": spec.to_dict()}
    return {}


def build_config(args, head: str, values, labels, tokenizer, info: dict | None = None):
    from nef_transformers.models.nef_gpt import NefGPTConfig

    if head == "causal_lm" and tokenizer is not None and not is_vocabulary_tokenizer(tokenizer):
        raise ValueError(f"--tokenizer is a {type(tokenizer).__name__}, which makes continuous chunks; input_ids "
                         "need the VQ tokenizer that produced them")
    layout = sequence_layout(tokenizer, head, values.shape[2] if values.ndim == 3 else None)
    length = values.shape[1]
    for name, ids in layout.items():
        if len(ids) != length:
            raise ValueError(f"the dataset's sequences have {length} positions but the tokenizer's {name} has "
                             f"{len(ids)}: was the dataset made by another tokenizer?")
    kwargs = dict(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        hidden_dropout=args.dropout, attention_dropout=args.dropout, max_position_embeddings=length, **layout,
        **(info or {}),
    )
    if head == "causal_lm":
        if tokenizer is None:
            raise ValueError("--tokenizer is required for input_ids: it fixes the vocabulary and the special ids")
        kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        kwargs.update(chunk_dim=values.shape[2], num_mixtures=args.num_mixtures,
                      mixture_covariance=args.mixture_covariance)
    if labels is not None:
        if int(labels.min()) < 0:
            raise ValueError(f"--class_conditional: the label column holds {int(labels.min())} (unknown label); "
                             "drop those rows or train without --class_conditional")
        kwargs["num_classes"] = int(labels.max()) + 1
    return NefGPTConfig(**kwargs)


def check_sequences(values, config, head: str, split: str) -> None:
    from nef_transformers.models.nef_gpt.modeling_nef_gpt import check_token_ids

    if head == "causal_lm":
        try:
            check_token_ids(values, config.vocab_size)
        except ValueError as error:
            raise ValueError(f"{split} split: {error} (tokenizer vocabulary: {config.vocab_size} ids)") from None
    if values.shape[1] != config.sequence_length:
        raise ValueError(f"{split} split has sequences of {values.shape[1]} positions; the model expects "
                         f"{config.sequence_length}")


# ---------------------------------------------------------------------------------------------- checkpoints
def run_signature(args, config, world_size: int, max_train_steps: int, num_train: int, num_validation: int) -> dict:
    """What must be equal for a resumed run to continue the same trajectory."""
    model = {k: v for k, v in config.to_dict().items()
             if k not in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")}
    signature = {name: getattr(args, name) for name in TRAJECTORY_ARGS}
    signature.update(world_size=world_size, max_train_steps=max_train_steps, num_train=num_train,
                     num_validation=num_validation, model_config=model)
    return signature


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file written), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def describe_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += describe_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v)  # noqa: E731
            differences.append(f"{prefix}{key}: checkpoint {short(old)}, now {short(new)}")
    return differences


# ------------------------------------------------------------------------------------------------ model card
BASE_CARD_TAGS = ("nef_transformers", "nef_gpt", "neural-fields", "weight-space")
# Rows of a metrics file that are not a trained generator (`nef_transformers.experiment.Run`): the training fields
# themselves (the ceiling), training weights plus noise, a Gaussian in weight space, the training fields through the
# learned strategy's autoencoder (its ceiling), a Gaussian over that autoencoder's latents and training fields with
# noise on those latents; for the code strategy, the training fields through its VAE's codes (its ceiling), codes
# from the VAE's N(0, I) and a mixture of Gaussians over the codes; and benchmarks/code_prior.py's own VAE prior.
BASELINE_ROWS = ("oracle-train", "noisy-train", "gaussian", "autoencoder-train", "gaussian-latent", "noisy-latent",
                 "code-train", "gaussian-code", "mixture-code", "vae-code-prior")
ORACLE_ROW = "oracle-train"
# (key in a metrics row, model-index type, model-index name, format in the card's table)
CARD_METRICS = (
    ("mmd", "mmd", "MMD", "{:.4g}"),
    ("cov", "cov", "COV (fraction of held-out items covered)", "{:.1%}"),
    ("one_nna", "1-nna", "1-NNA (leave-one-out 1-NN accuracy, 0.5 is ideal)", "{:.1%}"),
    ("fd", "frechet-distance", "Frechet distance (features of the run's classifier)", "{:.3g}"),
)
REQUIRED_ROW_KEYS = ("strategy", "num_samples", "invalid", *(key for key, *_ in CARD_METRICS))


def _check_metrics_row(row: dict, index: int, where: str) -> None:
    label = f"{where}: rows[{index}] (strategy {row.get('strategy')!r})"
    for key in REQUIRED_ROW_KEYS:
        if key not in row:
            raise ValueError(f"{label} has no key {key!r}; a result row needs {list(REQUIRED_ROW_KEYS)} (values may "
                             "be null when not measured)")
    # the metrics, and the optional numbers the card shows beside them
    for key in (*(key for key, *_ in CARD_METRICS), "memorisation_ratio", "top_k", "temperature"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{label}: {key!r} is {value!r}; expected a finite number, or null when not measured")
    for key in ("num_samples", "invalid"):
        if isinstance(row[key], bool) or not isinstance(row[key], int) or row[key] < 0:
            raise ValueError(f"{label}: {key!r} is {row[key]!r}; expected an integer >= 0")


def load_card_metrics(path: str | Path) -> dict:
    """The measurements a model card reports, from ``--card_metrics``: the ``metrics.json`` of
    ``nef-transformers quickstart`` or the ``generation_quality.json`` of ``benchmarks/generation_quality.py``.

    The reported row is the first whose strategy is not a baseline (`BASELINE_ROWS`), or, when the file also holds
    the mean over that setting's draws (a row with ``seeds``, as `experiment.seed_means` writes with several
    ``--sample-seeds``), that mean: one draw of a few hundred samples is not the model's number. The
    ``oracle-train`` row, when present, is shown beside it. Both must hold `REQUIRED_ROW_KEYS`; a missing file or
    key is a clear error.

    Returns:
        ``{"file", "generator", "oracle", "model", "source"}``: the file's path, the two rows (``oracle`` may be
        None), and the evaluated model folder and source when the file names them (else None).
    """
    path = Path(path)
    where = f"--card_metrics {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist: expected the metrics.json of `nef-transformers quickstart` "
                                "or the generation_quality.json of benchmarks/generation_quality.py")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{where} is not a JSON file: {error}") from None
    if not isinstance(payload, dict) or "rows" not in payload:
        raise ValueError(f"{where} has no key 'rows': expected a JSON object with a list of result rows, as "
                         "`nef-transformers quickstart` writes in metrics.json")
    rows = payload["rows"]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: 'rows' must be a non-empty list of result rows, got {rows!r:.80}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "strategy" not in row:
            raise ValueError(f"{where}: rows[{index}] has no key 'strategy'")
    chosen = [i for i, row in enumerate(rows) if row["strategy"] not in BASELINE_ROWS]
    if not chosen:
        raise ValueError(f"{where}: every row is an oracle or baseline ({[row['strategy'] for row in rows]}); "
                         "there is no generator row to report")
    from .experiment import generator_setting

    setting = generator_setting(rows[chosen[0]])
    reported = next((i for i in chosen if rows[i].get("seeds") and generator_setting(rows[i]) == setting), chosen[0])
    oracle = next((i for i, row in enumerate(rows) if row["strategy"] == ORACLE_ROW), None)
    for index in (reported, oracle):
        if index is not None:
            _check_metrics_row(rows[index], index, where)
    return {"file": str(path), "generator": rows[reported], "oracle": None if oracle is None else rows[oracle],
            "model": payload.get("model"), "source": payload.get("source")}


def evaluated_checkpoint(metrics: dict, folder: Path) -> str:
    """``"this"`` when the metrics file names the model folder it evaluated and its ``model.safetensors`` equals
    ``folder``'s, ``"other"`` when they differ, ``"unknown"`` when the file names none (or it is not on this disk)."""
    named = metrics.get("model")
    if not named:
        return "unknown"
    theirs, ours = Path(named) / "model.safetensors", Path(folder) / "model.safetensors"
    if not theirs.is_file() or not ours.is_file():
        return "unknown"
    from .experiment import file_digest

    return "this" if file_digest(theirs) == file_digest(ours) else "other"


def card_evaluation(metrics: dict, folder: Path) -> dict:
    """What the card's body shows of the measurements: the reported rows formatted, and where they come from."""
    generator = metrics["generator"]
    provenance = evaluated_checkpoint(metrics, folder)
    if provenance != "this":
        logger.warning("--card_metrics %s: %s; the model card says so beside the numbers", metrics["file"],
                       "the file names no model folder, so the numbers cannot be tied to this checkpoint"
                       if provenance == "unknown" else f"the numbers are of the model in {metrics['model']}, "
                       "not of this checkpoint")

    def display(row: dict, name: str) -> dict:
        cells = {key: "–" if row[key] is None else fmt.format(row[key]) for key, _, _, fmt in CARD_METRICS}
        if row.get("one_nna") is not None and row.get("one_nna_se") is not None:  # a mean over draws
            cells["one_nna"] += f" ± {row['one_nna_se']:.1%}"
        ratio = row.get("memorisation_ratio")
        cells["memorisation_ratio"] = "–" if ratio is None else f"{ratio:.2f}"
        return {"name": name, "invalid": f"{row['invalid']}/{row['num_samples']}", **cells}

    draws = len(generator.get("seeds") or ())
    settings = [f"top-k {generator['top_k']}" if generator.get("top_k") is not None else None,
                f"temperature {generator['temperature']:g}" if generator.get("temperature") is not None else None,
                f"mean of {draws} draws" if draws else None]
    label = generator["strategy"] + (f" ({', '.join(s for s in settings if s)})" if any(settings) else "")
    rows = [display(generator, label)]
    if metrics["oracle"] is not None:
        rows.append(display(metrics["oracle"], f"{ORACLE_ROW} (training fields as samples: the ceiling)"))
    return {"file": Path(metrics["file"]).name, "checkpoint": provenance,
            "evaluated_model": metrics["model"], "source": metrics["source"], "strategy": generator["strategy"],
            "top_k": generator.get("top_k"), "temperature": generator.get("temperature"),
            "num_samples": generator["num_samples"], "invalid": generator["invalid"], "draws": draws, "rows": rows}


def card_eval_results(metrics: dict, task_type: str, dataset_type: str) -> list:
    """The model-index entries (`huggingface_hub.EvalResult`) of the reported row: one per measured metric, the
    values exactly as in the file; none for metrics the file has as null."""
    from huggingface_hub import EvalResult

    generator = metrics["generator"]
    sampling = {key: generator[key] for key in ("top_k", "temperature", "num_samples")
                if generator.get(key) is not None}
    if generator.get("seeds"):  # a mean over draws: num_samples counts all of them
        sampling["draws"] = len(generator["seeds"])
    dataset_name = f"{metrics['source'] or dataset_type} (held-out items)"
    return [EvalResult(task_type=task_type, task_name="Unconditional neural-field generation",
                       dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="held-out",
                       metric_type=metric_type, metric_name=metric_name, metric_value=generator[key],
                       metric_args=sampling or None)
            for key, metric_type, metric_name, _ in CARD_METRICS if generator[key] is not None]


def model_card_context(args, argv: list[str], model, summary: dict, num_train: int, num_validation: int) -> dict:
    """The variables a model card template sees (besides ``evaluation``): the run's arguments and command line,
    the trained model, its config and field architecture (`SirenSpec`, or None when the dataset had no weight
    metadata), the data sizes and the final validation loss."""
    import shlex

    from .fields.spec import SirenSpec

    eval_loss = summary.get("eval_loss")
    spec = model.config.field_spec
    return {
        "field_spec": None if spec is None else SirenSpec.from_dict(spec), "field_source": model.config.field_source,
        "model_name": args.push_to_hub or Path(args.output_dir).name, "head": summary["head"],
        "architecture": type(model).__name__, "config": model.config,
        "num_parameters_m": f"{summary['num_parameters'] / 1e6:.2f}", "dataset_name": Path(args.dataset).name,
        "num_train": num_train, "num_validation": num_validation,
        "eval_loss": "n/a" if eval_loss is None else f"{eval_loss:.4f}", "completed_steps": summary["completed_steps"],
        "world_size": summary["world_size"], "args": vars(args), "command": shlex.join(argv),
    }


def render_model_card(template: str | Path, folder: Path, context: dict, metrics: dict | None = None):
    """Render a model card template (`nef_transformers.card_templates`) into ``folder/README.md`` and return it.

    The YAML gets ``library_name: transformers``, ``license: apache-2.0`` and `BASE_CARD_TAGS` unless the template
    says otherwise, the template's own metadata, and, only with ``metrics`` (`load_card_metrics`) measured on this
    very checkpoint (the metrics file names a model folder with the same weights), a model-index of the values. The body sees ``context`` plus ``evaluation`` (`card_evaluation`, or None without metrics).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .card_templates import merge_tags, render_card

    metadata, body = read_card_template(template)
    fields = {"library_name": "transformers", "license": "apache-2.0", **metadata}
    fields["tags"] = merge_tags(metadata.get("tags"), BASE_CARD_TAGS)
    evaluation = None
    if metrics is not None:
        evaluation = card_evaluation(metrics, folder)
        datasets = fields.get("datasets") or ["custom"]
        dataset_type = datasets if isinstance(datasets, str) else datasets[0]
        # the model-index states numbers of this checkpoint: only when the metrics file names this very model
        # (same weights); otherwise the body shows them, labelled as another checkpoint's
        results = card_eval_results(metrics, fields.get("pipeline_tag") or "other", dataset_type)
        if results and evaluation["checkpoint"] == "this":
            fields.update(model_name=context["model_name"], eval_results=results)
    card = render_card(ModelCard, ModelCardData(**fields), body, {**context, "evaluation": evaluation}, template)
    card.save(folder / "README.md")
    return card


def push_folder(folder: Path, repo_id: str, private: bool) -> list[str]:
    """One commit with the final folder's files (checkpoints and logs stay local); returns the pushed paths."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.relative_to(folder).parts[0] not in LOCAL_ONLY)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    api.create_commit(repo_id, operations=operations, commit_message="Upload NefGPT trained with examples/train.py")
    return files


# -------------------------------------------------------------------------------------------------- training
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    # read before training: a bad card template or metrics file must not surface only after the last step
    read_card_template(args.model_card_template)
    card_metrics = load_card_metrics(args.card_metrics) if args.card_metrics else None

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from nef_transformers.models.nef_gpt import NefGPTForCausalLM, NefGPTForWeightRegression, register

    register()
    output_dir = Path(args.output_dir)
    report_to = args.report_to
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401

            report_to = "tensorboard"
        except ImportError:
            report_to = "none"
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffle per epoch in every run: a resumed run sees exactly the batches it had left
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.device.type == "cpu":
        # ../shared/HF_NOTES.md trap 2: torch's default threads make small models several times slower on few
        # cores; `accelerate launch` sets 1, plain python does not
        torch.set_num_threads(args.num_threads or 1)
    set_seed(args.seed)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)

    # 1. data, tokenizer, config
    train_set, val_set = load_splits(args.dataset, args.validation_split, args.seed)
    head = detect_head(train_set, args.head)
    column = "input_ids" if head == "causal_lm" else "chunks"
    train_values, train_labels = to_tensors(train_set, column, args.class_conditional)
    val_values, val_labels = (to_tensors(val_set, column, args.class_conditional) if val_set is not None else (None, None))
    tokenizer = load_tokenizer(args.tokenizer)
    all_labels = None
    if train_labels is not None:
        all_labels = train_labels if val_labels is None else torch.cat([train_labels, val_labels])
    config = build_config(args, head, train_values, all_labels, tokenizer, field_info(train_set, tokenizer))
    if tokenizer is not None and head == "causal_lm":
        config.check_tokenizer(tokenizer)
    check_sequences(train_values, config, head, "train")
    if val_values is not None:
        check_sequences(val_values, config, head, "validation")

    model = (NefGPTForCausalLM if head == "causal_lm" else NefGPTForWeightRegression)(config)
    logger.info("%s: %.2fM parameters, %d train / %d validation sequences of %d positions, world size %d",
                type(model).__name__, model.num_parameters() / 1e6, len(train_values),
                0 if val_values is None else len(val_values), config.sequence_length, accelerator.num_processes)

    def make_dataset(values, labels, indexed=False):
        # the training set also yields each sequence's index (the mixup looks up its neighbours)
        extra = [torch.arange(len(values))] if indexed else []
        return TensorDataset(values, *([] if labels is None else [labels]), *extra)

    if args.chunk_noise and head == "causal_lm":
        raise ValueError("--chunk_noise is for continuous chunks (the regression head); token ids take no noise")
    # per (position, entry) std of the training chunks; 0 where a chunk is padded, so padding stays 0
    noise_scale = args.chunk_noise * train_values.float().std(0) if args.chunk_noise else None
    if args.mixup_neighbours and head == "causal_lm":
        raise ValueError("--mixup_neighbours is for continuous chunks (the regression head); token ids cannot be mixed")
    neighbours = (nearest_neighbours(train_values, train_labels, args.mixup_neighbours).to(accelerator.device)
                  if args.mixup_neighbours else None)
    mixup_pool = train_values.to(accelerator.device) if neighbours is not None else None

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(make_dataset(train_values, train_labels, indexed=neighbours is not None),
                              batch_size=args.per_device_train_batch_size, shuffle=True, generator=generator)
    val_loader = (DataLoader(make_dataset(val_values, val_labels), batch_size=args.per_device_eval_batch_size)
                  if val_values is not None else None)

    # 2. optimizer: decay matrices, not biases, norms or the start vector (nanoGPT)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # the prepared scheduler steps once per process per call (accelerate), hence the factor
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.lr_warmup_steps * accelerator.num_processes,
                                                max_train_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    signature = run_signature(args, config, accelerator.num_processes, max_train_steps, len(train_values),
                              0 if val_values is None else len(val_values))

    # 3. resume
    completed_steps, resumed_from = 0, None
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        state = json.loads((checkpoint / STATE_FILE).read_text())
        saved = {**TRAJECTORY_DEFAULTS, **state["signature"]}
        differences = describe_differences(saved, json.loads(json.dumps(signature)))
        if differences:
            raise ValueError(f"cannot resume from {checkpoint}: the run differs from the one that wrote it ("
                             + "; ".join(differences) + "). Resume with the original arguments, or start a new "
                             "--output_dir")
        accelerator.load_state(str(checkpoint))
        completed_steps, resumed_from = int(state["completed_steps"]), str(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, completed_steps)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("nef_gpt", config={k: v for k, v in vars(args).items()
                                                 if isinstance(v, (int, float, str, bool))})

    def forward(batch, model):
        values = batch[0]
        class_labels = batch[1] if args.class_conditional else None
        if head == "causal_lm":
            return model(input_ids=values, labels=values, class_labels=class_labels, use_cache=False)
        if neighbours is not None and model.training:
            values = mix_with_neighbours(values, batch[-1], mixup_pool, neighbours, args.mixup_max)
        if noise_scale is not None and model.training:
            values = values + noise_scale.to(values.device) * torch.randn_like(values)
        return model(labels=values, class_labels=class_labels, use_cache=False)

    def evaluate() -> float | None:
        if val_loader is None:
            return None
        model.eval()
        losses = []
        with torch.no_grad():
            for batch in val_loader:
                loss = forward(batch, model).loss
                losses.append(accelerator.gather_for_metrics(loss.detach().float().repeat(batch[0].shape[0])))
        model.train()
        return float(torch.cat(losses).mean())

    def save_checkpoint(step: int) -> None:
        folder = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps({"completed_steps": step, "signature": signature}, indent=1))
            for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    best_dir = output_dir / BEST_DIR
    best = {"eval_loss": float("inf"), "step": None}
    if args.keep_best_model and val_loader is None:
        raise ValueError("--keep_best_model needs a validation split (--validation_split > 0)")
    if args.keep_best_model and (best_dir / BEST_STATE).is_file():  # resumed: the best so far survives the restart
        best = json.loads((best_dir / BEST_STATE).read_text(encoding="utf-8"))

    def track_best(eval_loss: float | None, step: int) -> None:
        if not args.keep_best_model or eval_loss is None or not eval_loss < best["eval_loss"]:
            return
        best.update(eval_loss=eval_loss, step=step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            best_dir.mkdir(parents=True, exist_ok=True)
            tmp = best_dir / (BEST_WEIGHTS + ".tmp")
            save_file(_untied(accelerator.unwrap_model(model).state_dict()), str(tmp))
            os.replace(tmp, best_dir / BEST_WEIGHTS)
            (best_dir / BEST_STATE).write_text(json.dumps(best), encoding="utf-8")
        accelerator.wait_for_everyone()

    # 4. train
    history: list[dict] = []
    start_epoch = completed_steps // steps_per_epoch
    skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
    stop_at = min(max_train_steps, args.stop_after_steps or max_train_steps)
    model.train()
    progress = tqdm(total=max_train_steps, initial=completed_steps, desc="training", unit="step",
                    disable=not accelerator.is_local_main_process)
    running_loss, running_count, tokens_seen, start_time = 0.0, 0, 0, time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        if completed_steps >= stop_at:
            break
        train_loader.set_epoch(epoch)
        batches = train_loader
        if epoch == start_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = forward(batch, model).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running_loss += float(loss.detach())
            running_count += 1
            tokens_seen += batch[0].shape[0] * batch[0].shape[1] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == stop_at:
                record = {"step": completed_steps, "epoch": epoch, "train_loss": running_loss / running_count,
                          "learning_rate": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens_seen / (time.perf_counter() - start_time)}
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=completed_steps)
                history.append(record)
                progress.set_postfix(loss=f"{record['train_loss']:.4f}")
                running_loss, running_count = 0.0, 0
            if completed_steps % args.eval_steps == 0 and completed_steps != max_train_steps:
                eval_loss = evaluate()
                if eval_loss is not None:
                    accelerator.log({"eval_loss": eval_loss}, step=completed_steps)
                    history.append({"step": completed_steps, "eval_loss": eval_loss})
                track_best(eval_loss, completed_steps)
            if completed_steps % args.checkpointing_steps == 0 or completed_steps == stop_at:
                save_checkpoint(completed_steps)
            if completed_steps >= stop_at:
                break
    progress.close()

    # 5. validation, final folder, model card, hub
    summary = {"completed_steps": completed_steps, "max_train_steps": max_train_steps,
               "world_size": accelerator.num_processes, "resumed_from": resumed_from, "head": head,
               "num_parameters": accelerator.unwrap_model(model).num_parameters(), "finished": False,
               "chunk_noise": args.chunk_noise, "mixup_neighbours": args.mixup_neighbours,
               "mixup_max": args.mixup_max, "log_history": history}
    if completed_steps < max_train_steps:
        logger.info("stopped after step %d of %d (--stop_after_steps); resume with --resume_from_checkpoint latest",
                    completed_steps, max_train_steps)
        accelerator.end_training()
        return summary
    eval_loss = evaluate()
    summary.update(finished=True, eval_loss=eval_loss)
    if eval_loss is not None:
        accelerator.log({"eval_loss": eval_loss}, step=completed_steps)
        history.append({"step": completed_steps, "eval_loss": eval_loss})
    track_best(eval_loss, completed_steps)
    if args.keep_best_model:
        # the final folder holds the best weights; its validation loss is theirs, the last step's is kept beside it
        from safetensors.torch import load_file

        accelerator.wait_for_everyone()
        weights = load_file(str(best_dir / BEST_WEIGHTS))
        accelerator.unwrap_model(model).load_state_dict(weights, strict=False)
        summary.update(final_eval_loss=eval_loss, best_step=best["step"], eval_loss=best["eval_loss"])
        eval_loss = best["eval_loss"]
        logger.info("keeping the weights of step %s (validation loss %.4f; last step %.4f)", best["step"],
                    best["eval_loss"], summary["final_eval_loss"])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        if tokenizer is not None:
            # VQ tokenizers sit next to the model (AutoTokenizer, the pipeline); a chunker or autoencoder (whose
            # config.json would clash with the model's) goes to tokenizer/, as in `nef-transformers tokenize`'s OUT
            tokenizer.save_pretrained(output_dir if head == "causal_lm" else output_dir / "tokenizer")
        (output_dir / "trainer_state.json").write_text(json.dumps(summary, indent=1))
        render_model_card(args.model_card_template, output_dir, model_card_context(
            args, argv, unwrapped, summary, len(train_values), 0 if val_values is None else len(val_values)),
            card_metrics)
        logger.info("saved %s to %s (validation loss %s)", type(unwrapped).__name__, output_dir, eval_loss)
        if args.push_to_hub:
            summary["pushed_files"] = push_folder(output_dir, args.push_to_hub, args.hub_private)
            logger.info("pushed %d files to %s", len(summary["pushed_files"]), args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary



def cli() -> None:
    """``examples/train.py``'s entry point: ``main()``, with bad input reported as one error line (exit code 2)."""
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("train").error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    cli()
