"""NefGPT configuration: the one home of the transformer's hyperparameters.

A NefGPT reads sequences of a fixed length that its tokenizer fixes for one `SirenSpec`: the structure of
position ``i`` (which layer, which neuron, which quantiser level its token describes) is the same for every
field, so the config stores it as three lists and the model looks the ids up from the absolute position.
"""

from __future__ import annotations

from transformers import PretrainedConfig

STRUCTURE_FIELDS = ("token_layer_ids", "token_neuron_ids", "token_level_ids")
MIXTURE_COVARIANCES = ("diagonal", "full")


class NefGPTConfig(PretrainedConfig):
    r"""
    Configuration of a [`NefGPTModel`], [`NefGPTForCausalLM`] or [`NefGPTForWeightRegression`]: a decoder-only,
    pre-norm transformer over sequences of neural-field weights (VQ token ids, or continuous weight chunks).

    The defaults give a 4-layer, 128-wide model (4 query heads sharing 1 key/value head) whose positions cover
    the 197-token sequences of the default MNIST tokenizer (65 neurons x 3 quantiser levels + BOS/EOS). The size
    is set by sampling speed on 2 CPU cores, where reading the KV cache and the weights bounds each step: with
    `generate()`, 4 x 256 (8 heads) sampled about 0.6x the fields/s of 4 x 128 (`benchmarks/sampling_speed.py
    --hidden_size 256 --num_attention_heads 8 --heads causal_lm`).

    Args:
        vocab_size (`int`, *optional*, defaults to 1027):
            Number of token ids, special tokens included; must equal the tokenizer's `len(tokenizer)`.
        max_position_embeddings (`int`, *optional*, defaults to 256):
            Longest sequence the model can read (size of the learned absolute-position table). Inputs that
            reach past it raise a `ValueError`.
        hidden_size (`int`, *optional*, defaults to 128):
            Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 4):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 4):
            Attention heads per block; must divide `hidden_size`.
        num_key_value_heads (`int`, *optional*, defaults to 1):
            Key/value heads shared by the query heads (grouped-query attention; 1 = multi-query); must divide
            `num_attention_heads`. `None` means `num_attention_heads` (plain multi-head attention). Few KV heads
            keep the KV cache small: reading it bounds sampling speed on CPU.
        intermediate_size (`int`, *optional*):
            Width of the MLP inside each block; defaults to `4 * hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation, any key of `transformers.activations.ACT2FN` (the exact GELU: 3x faster than the tanh
            approximation on the AVX2 CPUs measured here).
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the embeddings and on each residual branch.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities (training only).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal init of linear and embedding weights (residual output
            projections are further scaled by `1 / sqrt(2 * num_hidden_layers)`, as in GPT-2).
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns its key/value cache (used by `generate()` and `sample()`).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the causal LM head shares its weight with the token embedding.
        pad_token_id (`int`, *optional*, defaults to 0):
            Id of the padding token.
        bos_token_id (`int`, *optional*, defaults to 1):
            Id of the beginning-of-sequence token: `generate()` without a prompt starts from it.
        eos_token_id (`int`, *optional*, defaults to 2):
            Id of the end-of-sequence token.
        token_layer_ids (`list[int]`, *optional*):
            Layer id of the token at each position, BOS/EOS included (the tokenizer's
            `structure_ids()["layer_ids"]`). For [`NefGPTForWeightRegression`] entry `i` describes the chunk
            predicted at position `i`. `None`: no layer embedding.
        token_neuron_ids (`list[int]`, *optional*):
            Neuron id (within its layer) of the token at each position; same length as `token_layer_ids`.
            `None`: no neuron embedding.
        token_level_ids (`list[int]`, *optional*):
            Quantiser level of the token at each position; same length as `token_layer_ids`. `None`: no level
            embedding.
        token_id_ranges (`list[list[int]]`, *optional*):
            For [`NefGPTForCausalLM`]: the half-open id range `[start, end)` allowed at each position (a VQ
            tokenizer gives every (codebook, level) its own range; `[bos, bos + 1]` first, `[eos, eos + 1]` last).
            `generate()` samples only inside it, so every sample decodes. `None`: any non-special id inside the
            sequence, EOS at its last position.
        num_classes (`int`, *optional*, defaults to 0):
            Number of class labels the model is conditioned on (`class_labels` in `forward`, `generate` and
            `sample`); 0 = unconditional. A conditional model also has a "no label" embedding, used when
            `class_labels` is not given.
        chunk_dim (`int`, *optional*, defaults to 33):
            Width of one continuous chunk for [`NefGPTForWeightRegression`] (33 = one neuron of a 32-wide
            SIREN: 32 incoming weights + its bias).
        token_chunk_widths (`list[int]`, *optional*):
            For [`NefGPTForWeightRegression`]: number of real (unpadded) leading entries of the chunk at each
            position; the rest is padding, ignored by the loss and zero in samples. `None`: every entry is real.
        num_mixtures (`int`, *optional*, defaults to 8):
            Gaussian-mixture components per chunk in the regression head.
        mixture_covariance (`str`, *optional*, defaults to `"diagonal"`):
            Covariance of each mixture component over a chunk's entries: `"diagonal"` (independent entries given
            the component: `2w` numbers per component) or `"full"` (a Cholesky factor: `w + w(w+1)/2` numbers,
            so entries of one chunk can be correlated within a component; for short chunks, such as the `code`
            strategy's chunks of 4).
        min_log_std (`float`, *optional*, defaults to -7.0):
            Lower bound of the predicted log standard deviations: keeps the NLL finite on (near-)constant
            entries.
        field_spec (`dict`, *optional*):
            The `SirenSpec` (as a dict) of the fields the sequences decode to; recorded by `examples/train.py`
            from the dataset's metadata. Not used by the model; the `neural-field-generation` pipeline reads it.
        field_source (`dict`, *optional*):
            The source description of the training fields (`kind` `"image"` or `"occupancy"`, image shape,
            mean/std, class names); lets the pipeline render samples. Not used by the model.

    Example:

    ```python
    >>> from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForCausalLM

    >>> config = NefGPTConfig(vocab_size=131, max_position_embeddings=16, hidden_size=32, num_attention_heads=4)
    >>> model = NefGPTForCausalLM(config)
    >>> model.config.model_type
    'nef_gpt'
    ```"""

    model_type = "nef_gpt"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 1027
    max_position_embeddings: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 1
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    token_layer_ids: list[int] | None = None
    token_neuron_ids: list[int] | None = None
    token_level_ids: list[int] | None = None
    token_id_ranges: list[list[int]] | None = None
    num_classes: int = 0
    chunk_dim: int = 33
    token_chunk_widths: list[int] | None = None
    num_mixtures: int = 8
    mixture_covariance: str = "diagonal"
    min_log_std: float | int = -7.0
    field_spec: dict | None = None
    field_source: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name in (*STRUCTURE_FIELDS, "token_chunk_widths"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [int(v) for v in value])
        if self.token_id_ranges is not None:
            self.token_id_ranges = [[int(start), int(end)] for start, end in self.token_id_ranges]
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise a `ValueError` that names the value and what would be valid (not `@strict`: its errors are
        not `ValueError`s)."""
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "chunk_dim", "num_mixtures"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"NefGPTConfig.{name} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"NefGPTConfig.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"NefGPTConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.mixture_covariance not in MIXTURE_COVARIANCES:
            raise ValueError(f"NefGPTConfig.mixture_covariance must be one of {MIXTURE_COVARIANCES}, got "
                             f"{self.mixture_covariance!r}")
        if self.num_classes < 0:
            raise ValueError(f"NefGPTConfig.num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"NefGPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        lengths = {name: len(getattr(self, name)) for name in (*STRUCTURE_FIELDS, "token_chunk_widths", "token_id_ranges")
                   if getattr(self, name) is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"NefGPTConfig structural lists must have one length (one entry per position), got {lengths}")
        for name, length in lengths.items():
            if length > self.max_position_embeddings:
                raise ValueError(
                    f"NefGPTConfig.{name} has {length} positions but max_position_embeddings is "
                    f"{self.max_position_embeddings}; raise max_position_embeddings to at least {length}"
                )
            if name != "token_id_ranges" and any(v < 0 for v in getattr(self, name)):
                raise ValueError(f"NefGPTConfig.{name} must hold ids >= 0, got min {min(getattr(self, name))}")
        for position, (start, end) in enumerate(self.token_id_ranges or []):
            if not 0 <= start < end <= self.vocab_size:
                raise ValueError(
                    f"NefGPTConfig.token_id_ranges[{position}] = [{start}, {end}) is not a non-empty range inside the "
                    f"vocabulary [0, {self.vocab_size})"
                )
        if self.token_chunk_widths is not None and max(self.token_chunk_widths, default=0) > self.chunk_dim:
            raise ValueError(
                f"NefGPTConfig.token_chunk_widths go up to {max(self.token_chunk_widths)} but chunk_dim is "
                f"{self.chunk_dim}"
            )

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def sequence_length(self) -> int:
        """Length of one field's sequence: the structural lists' length, else `max_position_embeddings`."""
        for name in (*STRUCTURE_FIELDS, "token_chunk_widths", "token_id_ranges"):
            if getattr(self, name) is not None:
                return len(getattr(self, name))
        return self.max_position_embeddings

    def num_structure_ids(self, name: str) -> int:
        """Size of the embedding table for one structural list (`max id + 1`; 0 when the list is unset)."""
        values = getattr(self, name)
        return 0 if values is None else max(values, default=-1) + 1

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a `ValueError` naming every mismatch between this config and a tokenizer.

        Compares the vocabulary size (`len(tokenizer)`), the special token ids and, when the tokenizer
        exposes `structure_ids()`, the structural positions.
        """
        problems = []
        vocab = len(tokenizer)
        if vocab != self.vocab_size:
            problems.append(f"the tokenizer has {vocab} token ids but the model's vocab_size is {self.vocab_size}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ours, theirs = getattr(self, name), getattr(tokenizer, name, None)
            if ours is not None and theirs is not None and ours != theirs:
                problems.append(f"{name}: model {ours}, tokenizer {theirs}")
        if hasattr(tokenizer, "structure_ids"):
            structure = tokenizer.structure_ids()
            for name, key in zip(STRUCTURE_FIELDS, ("layer_ids", "neuron_ids", "level_ids")):
                ours, theirs = getattr(self, name), structure.get(key)
                if ours is not None and theirs is not None and list(ours) != [int(v) for v in theirs]:
                    problems.append(f"{name} differ from the tokenizer's structure_ids()['{key}']")
        if problems:
            raise ValueError("tokenizer does not match the model: " + "; ".join(problems))


__all__ = ["NefGPTConfig"]
