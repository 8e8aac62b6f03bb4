"""Pipelines: `NeuralFieldGenerationPipeline`, the ``"neural-field-generation"`` task (registered on ``import
nef_transformers`` by `registration.py`), and the plain functions it is built on."""

from .neural_field_generation import (
    OUTPUT_TYPES,
    TASK,
    AutoModelForNeuralFieldGeneration,
    NeuralFieldGenerationPipeline,
    NeuralFieldSample,
    check_tokenization,
    find_tokenization,
    generate_weights,
    load_generation_folder,
)

__all__ = [
    "OUTPUT_TYPES",
    "TASK",
    "AutoModelForNeuralFieldGeneration",
    "NeuralFieldGenerationPipeline",
    "NeuralFieldSample",
    "check_tokenization",
    "find_tokenization",
    "generate_weights",
    "load_generation_folder",
]
