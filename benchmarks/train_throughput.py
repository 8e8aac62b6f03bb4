"""Training throughput of NefGPTForCausalLM against transformers' GPT2LMHeadModel of the same width, depth and
vocabulary, on the same token batches, in one run.

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --hidden_size 256 --num_attention_heads 8 --num_threads 2

Each round times `--steps` AdamW steps (forward, loss, backward, update) of every model after `--warmup_steps`;
rounds interleave the models so that load from other processes hits them alike, and the median round counts.
Rows: NefGPT with its defaults (grouped key/value heads), NefGPT with plain multi-head attention (one KV head per
query head, for an like-for-like comparison), GPT-2 (SDPA attention, no dropout). Target: ratio >= 1.0.

Prints a table, then one JSON line:
{"bench": "train_throughput", "tokens_per_s": ..., "gpt2_tokens_per_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args(argv=None):
    from nef_transformers.models.nef_gpt import NefGPTConfig

    defaults = NefGPTConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num_hidden_layers", type=int, default=defaults.num_hidden_layers)
    parser.add_argument("--num_attention_heads", type=int, default=defaults.num_attention_heads)
    parser.add_argument("--num_key_value_heads", type=int, default=defaults.num_key_value_heads)
    parser.add_argument("--vocab_size", type=int, default=defaults.vocab_size)
    parser.add_argument("--sequence_length", type=int, default=197, help="the default MNIST tokenizer's length")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch threads (1: ../shared/HF_NOTES.md trap 2, and fair under shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_models(args) -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForCausalLM

    common = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                  num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                  max_position_embeddings=args.sequence_length)
    gpt2_config = GPT2Config(n_embd=args.hidden_size, n_layer=args.num_hidden_layers, n_head=args.num_attention_heads,
                             vocab_size=args.vocab_size, n_positions=args.sequence_length, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return {
        "nef_gpt": NefGPTForCausalLM(NefGPTConfig(num_key_value_heads=args.num_key_value_heads, **common)),
        "nef_gpt_mha": NefGPTForCausalLM(NefGPTConfig(num_key_value_heads=args.num_attention_heads, **common)),
        "gpt2": GPT2LMHeadModel(gpt2_config),
    }


def time_steps(model, optimizer, batches, steps: int) -> float:
    """Seconds for `steps` optimizer steps."""
    start = time.perf_counter()
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    models = build_models(args)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(3, args.vocab_size, (args.batch_size, args.sequence_length), generator=generator)
               for _ in range(4)]
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    for name, model in models.items():
        model.train()
        time_steps(model, optimizers[name], batches, args.warmup_steps)
    tokens = args.steps * args.batch_size * args.sequence_length
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rates[name].append(tokens / time_steps(model, optimizers[name], batches, args.steps))
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(f"training throughput: {args.num_hidden_layers} layers x {args.hidden_size}, {args.num_attention_heads} "
          f"heads, vocab {args.vocab_size}, batch {args.batch_size} x {args.sequence_length} tokens, "
          f"{args.num_threads} thread(s), median of {args.rounds} rounds")
    print(f"{'model':<12} {'params (M)':>10} {'tokens/s':>10} {'vs gpt2':>8}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<12} {params:>10.2f} {median[name]:>10.0f} {median[name] / median['gpt2']:>8.2f}")
    result = {"bench": "train_throughput", "tokens_per_s": round(median["nef_gpt"], 1),
              "gpt2_tokens_per_s": round(median["gpt2"], 1), "ratio": round(median["nef_gpt"] / median["gpt2"], 3),
              "mha_tokens_per_s": round(median["nef_gpt_mha"], 1),
              "mha_ratio": round(median["nef_gpt_mha"] / median["gpt2"], 3),
              "hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
              "num_attention_heads": args.num_attention_heads, "num_key_value_heads": args.num_key_value_heads,
              "vocab_size": args.vocab_size, "sequence_length": args.sequence_length, "batch_size": args.batch_size,
              "num_threads": args.num_threads}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
