"""Sampling speed of NefGPT with and without the KV cache, for both heads, at the default MNIST sequence length.

    python benchmarks/sampling_speed.py
    python benchmarks/sampling_speed.py --num_threads 2 --num_fields 512

The layout is the default MNIST field (SIREN 2->32->32->1: 65 neurons, chunked per neuron by
`nef_transformers.tokenization.chunking.NeuronChunker`): the causal LM samples 65 x `--levels` codes + BOS/EOS
(197 tokens) with `generate()` (its default settings: top-k 5, temperature 0.8, static cache), the regression head
samples 65 chunks of 33 values with `sample()`. Models are the `NefGPTConfig` defaults (or `--hidden_size` ...)
with random weights (speed does not depend on the weights).

- `fields_per_s`: with the cache, `--num_fields` fields per call;
- `no_cache_fields_per_s`: without the cache (the prefix recomputed every step), `--compare_fields` per call;
- `speedup`: cached over uncached fields/s at the same batch of `--compare_fields` fields.
Targets: speedup >= 5, and >= 100 MNIST fields/s on 2 cores.

Prints a table, then one JSON line per head:
{"bench": "sampling_speed", "head": ..., "fields_per_s": ..., "no_cache_fields_per_s": ..., "speedup": ...}
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--heads", nargs="+", choices=("causal_lm", "regression"), default=["causal_lm", "regression"])
    parser.add_argument("--num_fields", type=int, default=256, help="fields per cached sampling call")
    parser.add_argument("--compare_fields", type=int, default=32, help="fields per call in the cache/no-cache comparison")
    parser.add_argument("--levels", type=int, default=3, help="residual-VQ levels (tokens) per chunk")
    parser.add_argument("--chunking", choices=("neuron", "scalar"), default="neuron",
                        help="neuron: 65 chunks (197 tokens with 3 levels); scalar: 1,185 chunks of 1 value")
    parser.add_argument("--vocab_size", type=int, default=None, help="default: NefGPTConfig's")
    parser.add_argument("--hidden_size", type=int, default=None, help="default: NefGPTConfig's (also the next two)")
    parser.add_argument("--num_hidden_layers", type=int, default=None)
    parser.add_argument("--num_attention_heads", type=int, default=None)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch threads (1: ../shared/HF_NOTES.md trap 2; measured faster on shared 2-core machines)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def mnist_layout(levels: int, chunking: str = "neuron") -> dict:
    """Structural lists of the default MNIST field for both heads (ids from 1; 0 at BOS/EOS)."""
    from nef_transformers.fields.spec import SirenSpec
    from nef_transformers.tokenization.chunking import NeuronChunker

    chunker = NeuronChunker(SirenSpec(), mode=chunking)
    layers, neurons = (chunker.layer_ids + 1).tolist(), (chunker.neuron_ids + 1).tolist()
    token = {"token_layer_ids": [0], "token_neuron_ids": [0], "token_level_ids": [0]}
    for layer, neuron in zip(layers, neurons):
        for level in range(levels):
            token["token_layer_ids"].append(layer)
            token["token_neuron_ids"].append(neuron)
            token["token_level_ids"].append(level + 1)
    for ids in token.values():
        ids.append(0)
    chunk = {"token_layer_ids": layers, "token_neuron_ids": neurons,
             "token_chunk_widths": chunker.widths.tolist(), "chunk_dim": int(chunker.mask.shape[1])}
    return {"causal_lm": token, "regression": chunk}


def build_model(head: str, layout: dict, **sizes):
    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForCausalLM, NefGPTForWeightRegression

    extra = {name: value for name, value in sizes.items() if value is not None}
    config = NefGPTConfig(max_position_embeddings=len(layout["token_layer_ids"]), **layout, **extra)
    model = NefGPTForCausalLM(config) if head == "causal_lm" else NefGPTForWeightRegression(config)
    return model.eval()


def sample(model, head: str, num_fields: int, use_cache: bool, seed: int) -> torch.Tensor:
    if head == "causal_lm":
        return model.generate(num_return_sequences=num_fields, use_cache=use_cache, seed=seed)
    return model.sample(num_fields, use_cache=use_cache, seed=seed)


def fields_per_s(model, head: str, num_fields: int, use_cache: bool, seed: int) -> float:
    start = time.perf_counter()
    out = sample(model, head, num_fields, use_cache, seed)
    elapsed = time.perf_counter() - start
    if out.shape[0] != num_fields or out.shape[1] != model.config.sequence_length:
        raise RuntimeError(f"{head} sampled shape {tuple(out.shape)}, expected ({num_fields}, {model.config.sequence_length}, ...)")
    return num_fields / elapsed


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    layouts = mnist_layout(args.levels, args.chunking)
    results = []
    for head in args.heads:
        model = build_model(head, layouts[head], vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads)
        sample(model, head, 2, True, args.seed)  # warm-up: allocator, first-call dispatch
        cached = fields_per_s(model, head, args.num_fields, True, args.seed)
        cached_small = fields_per_s(model, head, args.compare_fields, True, args.seed)
        uncached_small = fields_per_s(model, head, args.compare_fields, False, args.seed)
        results.append({"bench": "sampling_speed", "head": head, "fields_per_s": round(cached, 2),
                        "no_cache_fields_per_s": round(uncached_small, 3),
                        "speedup": round(cached_small / uncached_small, 2),
                        "cached_fields_per_s_at_compare": round(cached_small, 2),
                        "sequence_length": model.config.sequence_length, "num_fields": args.num_fields,
                        "compare_fields": args.compare_fields, "num_threads": args.num_threads,
                        "hidden_size": model.config.hidden_size, "num_hidden_layers": model.config.num_hidden_layers,
                        "vocab_size": model.config.vocab_size if head == "causal_lm" else None})

    print(f"sampling speed, NefGPT ({results[0]['num_hidden_layers']} x {results[0]['hidden_size']}), "
          f"{args.num_threads} thread(s)")
    print(f"{'head':<11} {'positions':>9} {'cached f/s':>11} {'@' + str(args.compare_fields) + ' cached':>11} "
          f"{'@' + str(args.compare_fields) + ' no cache':>13} {'speedup':>8}")
    for r in results:
        print(f"{r['head']:<11} {r['sequence_length']:>9} {r['fields_per_s']:>11.1f} "
              f"{r['cached_fields_per_s_at_compare']:>11.1f} {r['no_cache_fields_per_s']:>13.2f} {r['speedup']:>8.1f}")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
