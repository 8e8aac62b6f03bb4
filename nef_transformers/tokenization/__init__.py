"""Weights -> sequences: per-neuron / per-scalar chunks with structure (`NeuronChunker`), hidden-unit canonical
forms, residual VQ, the `NefVQTokenizer` (a `PreTrainedTokenizer`), a learned encoder-decoder
(`NefAutoencoder`), a compact code per field over its latents (`NefCodeVAE`) and the training entry point
`train_tokenizer`.

Every name loads on first use: the modules that need transformers (`NefVQTokenizer`, `train_tokenizer`) are
not imported by those that do not (`NeuronChunker`, `ResidualVQ`, the command-line parser).
"""

from importlib import import_module

_LAZY = {
    "CHUNK_MODES": "chunking",
    "NeuronChunker": "chunking",
    "CANONICAL_METHODS": "permutation",
    "canonical_permutations": "permutation",
    "canonicalize": "permutation",
    "permute_hidden_units": "permutation",
    "ResidualVQ": "quantizer",
    "NefVQTokenizer": "tokenization_nef_vq",
    "MissingCodebookError": "tokenization_nef_vq",
    "register_tokenizer": "tokenization_nef_vq",
    "NefAutoencoder": "learned",
    "NefAutoencoderConfig": "learned",
    "train_autoencoder": "learned",
    "NefCodeConfig": "code",
    "NefCodeVAE": "code",
    "decoder_metric": "code",
    "train_code_vae": "code",
    "COMPACT_VQ_CONFIG": "train",
    "TokenizationResult": "train",
    "VQTokenizerConfig": "train",
    "codebook_usage": "train",
    "load_tokenization": "train",
    "train_tokenizer": "train",
    "train_vq_tokenizer": "train",
    "add_tokenize_command": "command",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
