"""Every AutoClass registration of the package, in one place; imported once by ``nef_transformers/__init__.py``.

After ``import nef_transformers``, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(folder)`` load NefGPT checkpoints and NefVQ tokenizers without
``trust_remote_code``.
"""

from .models.nef_gpt import register as register_nef_gpt
from .tokenization.tokenization_nef_vq import register_tokenizer

register_nef_gpt()
register_tokenizer()
