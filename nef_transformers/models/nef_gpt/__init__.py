"""NefGPT: the autoregressive transformer over neural-field weights (config, base model, two heads)."""

from .configuration_nef_gpt import NefGPTConfig
from .modeling_nef_gpt import (
    NefGPTForCausalLM,
    NefGPTForWeightRegression,
    NefGPTModel,
    NefGPTPreTrainedModel,
    NefGPTWeightRegressionOutput,
)


def register() -> None:
    """Register NefGPT with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (idempotent), so that
    `Auto*.from_pretrained(folder)` loads it without `trust_remote_code`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(NefGPTConfig.model_type, NefGPTConfig, exist_ok=True)
    AutoModel.register(NefGPTConfig, NefGPTModel, exist_ok=True)
    AutoModelForCausalLM.register(NefGPTConfig, NefGPTForCausalLM, exist_ok=True)


__all__ = [
    "NefGPTConfig",
    "NefGPTPreTrainedModel",
    "NefGPTModel",
    "NefGPTForCausalLM",
    "NefGPTForWeightRegression",
    "NefGPTWeightRegressionOutput",
    "register",
]
