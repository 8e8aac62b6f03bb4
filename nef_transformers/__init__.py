"""nef_transformers: generate neural fields by generating their weights with an autoregressive transformer.

Importing the package registers NefGPT and the NefVQ tokenizer with the transformers AutoClasses.
"""

__version__ = "0.1.0"

from . import registration  # noqa: F401  (AutoClass registration, once)
from .data import build_nef_dataset, get_shared_init, get_spec, load_nef_dataset, load_source
from .fields import FitConfig, SirenSpec, fit_neural_fields, siren_forward
from .models.nef_gpt import NefGPTConfig, NefGPTForCausalLM, NefGPTForWeightRegression, NefGPTModel
from .tokenization.tokenization_nef_vq import NefVQTokenizer

__all__ = [
    "FitConfig", "NefGPTConfig", "NefGPTForCausalLM", "NefGPTForWeightRegression", "NefGPTModel", "NefVQTokenizer",
    "SirenSpec", "build_nef_dataset", "fit_neural_fields", "get_shared_init", "get_spec", "load_nef_dataset",
    "load_source", "siren_forward",
]
