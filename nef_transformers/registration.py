"""Every AutoClass and pipeline registration of the package, in one place; imported once by
``nef_transformers/__init__.py``.

After ``import nef_transformers``, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(folder)`` load NefGPT checkpoints and NefVQ tokenizers without
``trust_remote_code``, and ``transformers.pipeline("neural-field-generation", model=folder)`` samples fields.
"""

from transformers.pipelines import PIPELINE_REGISTRY

from .models.nef_gpt import register as register_nef_gpt
from .pipelines import TASK, AutoModelForNeuralFieldGeneration, NeuralFieldGenerationPipeline
from .tokenization.tokenization_nef_vq import register_tokenizer

register_nef_gpt()
register_tokenizer()
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    # pt_model is only the head dispatcher: after it, load_model would try the next class on any error, and
    # AutoModelForCausalLM loads a regression checkpoint as a causal LM (see AutoModelForNeuralFieldGeneration)
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=NeuralFieldGenerationPipeline,
                                        pt_model=AutoModelForNeuralFieldGeneration)
