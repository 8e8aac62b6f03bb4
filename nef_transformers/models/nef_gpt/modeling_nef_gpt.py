"""NefGPT: a decoder-only transformer over the weights of neural fields, in one file, top to bottom.

Layers (attention, MLP, block) -> `NefGPTPreTrainedModel` -> `NefGPTModel` -> heads:

- `NefGPTForCausalLM`: next-token classification over VQ token ids (`NefVQTokenizer`), sampled with
  `generate()` (the proposal's learned-vocabulary strategy; MeshGPT, https://arxiv.org/abs/2311.15475);
- `NefGPTForWeightRegression`: continuous weight chunks in, a Gaussian mixture per chunk out (the naive and
  learned-embedding strategies); a mixture rather than a point regression, so sampling is diverse
  (mixture density networks: Bishop 1994; sketch-rnn's temperature: Ha & Eck, https://arxiv.org/abs/1704.03477).
  Each component's covariance over a chunk is diagonal, or full (`config.mixture_covariance="full"`: a Cholesky
  factor, as sketch-rnn's bivariate normals).

Embeddings: token (or projected chunk) + absolute position + the structural ids of the position (layer, neuron,
quantiser level: fixed per position, stored in the config, looked up from the absolute position, so cached
decoding needs no extra inputs) + an optional class embedding.

Axis legend: ``b`` batch (fields), ``t`` tokens/positions, ``s`` cached + new positions, ``d`` hidden features,
``h`` heads, ``e`` features per head, ``k`` mixture components, ``w`` chunk width, ``v`` vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_nef_gpt import STRUCTURE_FIELDS, NefGPTConfig

# transformers 5.x renamed the outputs' `past_key_values` to `cache` (HF_NOTES.md); releases before the rename
# (5.17 on a lent GPU machine, say) still build and read `past_key_values`. Both are supported.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclass_fields(BaseModelOutputWithPast)} else "past_key_values"


def _cache_of(outputs) -> Cache | None:
    return getattr(outputs, _CACHE_FIELD)


# ------------------------------------------------------------------------------------------------- layers
class NefGPTAttention(nn.Module):
    """Causal multi-head self-attention through `torch.nn.functional.scaled_dot_product_attention`, with
    grouped key/value heads (GQA, https://arxiv.org/abs/2305.13245): `num_key_value_heads` heads of keys and
    values serve all query heads, which shrinks the KV cache that bounds sampling speed on CPU."""

    def __init__(self, config: NefGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        # one fused projection: a single matmul is faster on CPU than three
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj.is_residual_projection = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None,
        kv_length: int,
    ) -> torch.Tensor:
        b, t, d = hidden_states.shape
        h, g, e = self.num_heads, self.num_kv_heads, self.head_dim
        query, key, value = self.qkv_proj(hidden_states).split([h * e, g * e, g * e], dim=-1)
        query = query.view(b, t, h, e).transpose(1, 2)  # (b, h, t, e)
        key = key.view(b, t, g, e).transpose(1, 2)  # (b, g, t, e)
        value = value.view(b, t, g, e).transpose(1, 2)  # (b, g, t, e)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            # a static cache hands back its whole preallocated length: keep the filled part only
            key, value = key[:, :, :kv_length], value[:, :, :kv_length]  # (b, g, s, e)
        dropout = self.attention_dropout if self.training else 0.0
        if t == 1 and attention_mask is None:
            # one new token attends to every cached one: the h / g query heads of a group become that group's
            # "queries", so each key/value head is read once (decoding is bound by reading the cache)
            out = F.scaled_dot_product_attention(query.reshape(b, g, h // g, e), key, value, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, is_causal=is_causal, dropout_p=dropout,
                enable_gqa=g != h,
            )  # (b, h, t, e)
        return self.o_proj(out.reshape(b, h, t, e).transpose(1, 2).reshape(b, t, d))


class NefGPTMLP(nn.Module):
    def __init__(self, config: NefGPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.fc_out.is_residual_projection = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(hidden_states)))


class NefGPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: NefGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = NefGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = NefGPTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask, is_causal, cache, kv_length):
        hidden_states = hidden_states + self.dropout(
            self.attn(self.ln_1(hidden_states), attention_mask, is_causal, cache, kv_length)
        )
        return hidden_states + self.dropout(self.mlp(self.ln_2(hidden_states)))


# -------------------------------------------------------------------------------------------- base classes
class NefGPTPreTrainedModel(PreTrainedModel):
    config: NefGPTConfig
    config_class = NefGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NefGPTBlock"]
    _supports_sdpa = True
    _supports_attention_backend = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """[`~transformers.PreTrainedModel.from_pretrained`] that refuses incomplete or corrupt checkpoints.

        transformers would build a default config for a folder without `config.json`, and newly initialise
        weights missing from the file with only a log line; here both raise an `OSError` naming the folder.
        """
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and kwargs.get("config") is None:
            config_file = os.path.join(path, kwargs.get("subfolder", ""), "config.json")
            if not os.path.isfile(config_file):
                raise OSError(
                    f"{path} has no config.json: not a saved NefGPT checkpoint (save_pretrained writes config.json, "
                    "model.safetensors and generation_config.json)"
                )
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise OSError(f"the weights file in {path} is corrupt or truncated ({error}); save or download it again") from error
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise OSError(
                f"the checkpoint in {path} lacks {len(missing)} weights of {cls.__name__} ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}): the file is incomplete or holds another architecture"
            )
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module):
        """The only init path: GPT-2's normal(0, initializer_range), residual projections scaled by depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # GPT-2: a residual branch's output projection gets std / sqrt(2 * num_layers), so the residual
                # stream's variance does not grow with depth
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, NefGPTWeightRegressionHead):
            init.normal_(module.start_embedding, mean=0.0, std=std)


def _cache_length(cache: Cache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


# ---------------------------------------------------------------------------------------------- base model
class NefGPTModel(NefGPTPreTrainedModel):
    """The bare transformer: embeddings, blocks, final LayerNorm; returns hidden states and the cache."""

    def __init__(self, config: NefGPTConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        # one table per structural list set in the config (sized max id + 1)
        self.embed_structure = nn.ModuleDict({
            name: nn.Embedding(config.num_structure_ids(name), d)
            for name in STRUCTURE_FIELDS if getattr(config, name) is not None
        })
        # a conditional model has num_classes labels plus one "no label" entry (index num_classes)
        self.embed_classes = nn.Embedding(config.num_classes + 1, d) if config.num_classes > 0 else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([NefGPTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        # structural ids as plain per-device tensors built from the config (not buffers: from_pretrained would
        # leave non-persistent buffers uninitialised, and persistent ones would duplicate the config)
        self._structure_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def _structure_ids(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        tables = self._structure_tables.get(positions.device)
        if tables is None:
            tables = {n: torch.tensor(getattr(self.config, n), dtype=torch.long, device=positions.device)
                      for n in self.embed_structure}
            self._structure_tables[positions.device] = tables
        return tables[name][positions]

    def _class_embedding(self, class_labels: torch.Tensor | None, batch_size: int, device) -> torch.Tensor | None:
        num_classes = self.config.num_classes
        if class_labels is None:
            if self.embed_classes is None:
                return None
            class_labels = torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
        else:
            class_labels = check_class_labels(class_labels, num_classes, batch_size).to(device)
        return self.embed_classes(class_labels)[:, None, :]  # (b, 1, d)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        class_labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(b, t)`): token ids; or give `inputs_embeds` `(b, t, d)`.
            attention_mask (`torch.Tensor` of shape `(b, s)`, *optional*): 1 for real tokens, 0 for padding,
                over cached + new positions. Positions are absolute (cache length + offset): pad on the right.
            cache (`Cache`, *optional*): key/value cache of earlier positions (transformers 5.x `cache=`).
            use_cache (`bool`, *optional*): return the (new or updated) cache.
            class_labels (`torch.LongTensor` of shape `(b,)`, *optional*): labels in `[0, num_classes)` of a
                conditional model; `None` uses its "no label" embedding.
        """
        cache = cache if cache is not None else past_key_values  # transformers before the rename pass this
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("NefGPTModel.forward needs exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (b, t, d)
        b, t, _ = inputs_embeds.shape
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = _cache_length(cache)
        kv_length = past + t
        self._check_length(kv_length)

        # 1. embeddings: token + absolute position + structure of the position (+ class)
        positions = torch.arange(past, kv_length, device=inputs_embeds.device)
        hidden_states = inputs_embeds + self.embed_positions(positions)
        for name, table in self.embed_structure.items():
            hidden_states = hidden_states + table(self._structure_ids(name, positions))
        class_embedding = self._class_embedding(class_labels, b, inputs_embeds.device)
        if class_embedding is not None:
            hidden_states = hidden_states + class_embedding
        hidden_states = self.dropout(hidden_states)

        # 2. mask: SDPA's causal fast path unless padding or a multi-token step after a cache needs a real one
        mask, is_causal = build_attention_mask(attention_mask, past, t, kv_length, hidden_states.device)

        # 3. blocks
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, mask, is_causal, cache, kv_length)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)

        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                         **{_CACHE_FIELD: cache})
        return output if return_dict else output.to_tuple()

    def _check_length(self, kv_length: int) -> None:
        limit = self.config.max_position_embeddings
        if kv_length > limit:
            raise ValueError(
                f"sequence of {kv_length} positions is longer than max_position_embeddings={limit} of this NefGPT; "
                f"a field's sequence has {self.config.sequence_length} positions"
            )
        if self.embed_structure and kv_length > self.config.sequence_length:
            raise ValueError(
                f"sequence of {kv_length} positions is longer than the {self.config.sequence_length} structural "
                f"positions (token_layer_ids, ...) of this NefGPT's tokenizer layout"
            )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a `ValueError` for ids outside `[0, vocab_size)` (an embedding lookup would fail cryptically)."""
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids hold ids in [{low}, {high}] but the model's vocabulary is [0, {vocab_size}): "
            "was this sequence made by another tokenizer?"
        )


def check_class_labels(class_labels, num_classes: int, batch_size: int | None = None) -> torch.Tensor:
    """Validate class labels for a model trained on `num_classes` classes; returns a `(b,)` LongTensor."""
    if num_classes == 0:
        raise ValueError("class_labels were given but this NefGPT is unconditional (config.num_classes = 0)")
    labels = torch.as_tensor(class_labels)
    if labels.ndim == 0:
        labels = labels.reshape(1)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be a (b,) tensor of integer labels, got {labels.dtype} of shape {tuple(labels.shape)}")
    if batch_size is not None and labels.shape[0] not in (1, batch_size):
        raise ValueError(f"{labels.shape[0]} class_labels for a batch of {batch_size} sequences")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class label {int(bad[0])} is outside the trained classes [0, {num_classes}) of this NefGPT"
        )
    if batch_size is not None and labels.shape[0] == 1 and batch_size > 1:
        labels = labels.expand(batch_size)
    return labels.long()


def build_attention_mask(attention_mask, past: int, t: int, kv_length: int, device):
    """`(mask, is_causal)` for SDPA: queries at positions ``past..past+t-1`` over keys ``0..kv_length-1``.

    Returns `(None, True)` for a causal prefill and `(None, False)` for a one-token cached step (the fast
    paths); otherwise a `(b or 1, 1, t, s)` boolean mask (True = attend). A 4D mask is used as given.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask[..., :kv_length].to(device), False
    padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2 or attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the {kv_length} cached + "
                "new positions: expected (b, cache length + sequence length)"
            )
        if not bool(attention_mask.all()):
            padding = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (b, 1, 1, s)
    if padding is None:
        if past == 0:
            return None, t > 1
        if t == 1:
            return None, False
    query_pos = torch.arange(past, kv_length, device=device)[:, None]
    key_pos = torch.arange(kv_length, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # (1, 1, t, s)
    if padding is not None:
        # a query always sees itself, so a fully padded row never turns into NaN
        mask = (mask & padding) | (key_pos == query_pos)[None, None]
    return mask, False


# --------------------------------------------------------------------------------------------- causal LM
class FixedLayoutLogitsProcessor(LogitsProcessor):
    """Keeps generated sequences in the tokenizer's fixed layout, so that every sample decodes: at each position
    only the ids of `config.token_id_ranges` (its codebook and level), or, without ranges, no special token before
    the last position and EOS at the last one. Positions past the layout are left alone."""

    def __init__(self, config: NefGPTConfig):
        length, vocab = config.sequence_length, config.vocab_size
        allowed = torch.zeros(length, vocab, dtype=torch.bool)  # (t, v)
        if config.token_id_ranges is not None:
            for position, (start, end) in enumerate(config.token_id_ranges):
                allowed[position, start:end] = True
        else:
            allowed[:] = True
            special = [i for i in (config.bos_token_id, config.eos_token_id, config.pad_token_id) if i is not None]
            allowed[:, special] = False
            allowed[-1] = False
            allowed[-1, config.eos_token_id] = True
        self.allowed = allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1]  # the position being sampled
        if position >= self.allowed.shape[0]:
            return scores
        if self.allowed.device != scores.device:
            self.allowed = self.allowed.to(scores.device)
        # a new tensor: generate keeps the raw logits for `output_logits`
        return scores.masked_fill(~self.allowed[position], -float("inf"))


def check_sampling_settings(top_k=None, temperature=None, top_p=None) -> None:
    """Raise a `ValueError` for `top_k <= 0`, `temperature <= 0` or `top_p` outside (0, 1] (`None` = unset)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int (the number of candidate tokens), got {top_k!r}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (use do_sample=False for greedy decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class NefGPTForCausalLM(NefGPTPreTrainedModel, GenerationMixin):
    """NefGPT with a tied linear head over the VQ vocabulary, sampled with `generate()`.

    `generate()` without a prompt starts at BOS; the default sampling settings (top-k 5, temperature 0.8, the
    proposal's), `max_length` = the sequence length and a static KV cache live in `generation_config` and are
    saved with the model. Sampling keeps the tokenizer's layout (`FixedLayoutLogitsProcessor`), so every
    generated sequence decodes to weights.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NefGPTConfig):
        super().__init__(config)
        self.model = NefGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config.do_sample = True
        self.generation_config.top_k = 5
        self.generation_config.temperature = 0.8
        self.generation_config.max_length = config.sequence_length
        # a preallocated cache: the default DynamicCache concatenates at every step, O(t^2) copies on CPU
        self.generation_config.cache_implementation = "static"

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache=None, position_ids=None,
                                  **kwargs):
        """`generate()` hook for static caches: keep the 2D padding mask, NefGPT builds its own SDPA mask (and
        skips it on the causal and one-token fast paths) in `build_attention_mask`."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        class_labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(b, t)`): token ids, BOS first.
            labels (`torch.LongTensor` of shape `(b, t)`, *optional*): targets, usually `input_ids`; shifted
                inside (position `i` predicts token `i + 1`); -100 is ignored. The loss is computed only when given.
            class_labels (`torch.LongTensor` of shape `(b,)`, *optional*): see [`NefGPTModel.forward`].
            logits_to_keep (`int`, *optional*, defaults to 0): compute logits for the last `n` positions only
                (0 = all); `generate()` uses 1.

        Returns: [`~transformers.modeling_outputs.CausalLMOutputWithPast`] with `logits` `(b, t, v)` and `cache`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache if cache is not None else past_key_values
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache, class_labels=class_labels, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (b, t, v)

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the logits' {tuple(logits.shape[:2])}")
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{_CACHE_FIELD: _cache_of(outputs)}
        )
        return output if return_dict else output.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, seed: int | None = None, **kwargs):
        r"""[`~transformers.GenerationMixin.generate`] with NefGPT's checks and options.

        Args:
            inputs (`torch.LongTensor` of shape `(b, t)`, *optional*): a prompt; `None` starts every sequence
                at BOS (`num_return_sequences` of them, or one per entry of `class_labels`).
            seed (`int`, *optional*): seed of the sampling draws (the global RNG is restored afterwards).
            class_labels (`torch.LongTensor` of shape `(b,)`, *optional*): condition on these classes.
            kwargs: anything `GenerationMixin.generate` takes (`top_k`, `top_p`, `temperature`,
                `num_return_sequences`, `do_sample`, `max_length`, `use_cache`, ...).

        Each position samples only the ids its layout allows (`config.token_id_ranges`, else no special token
        before the last position and EOS there). Raises `ValueError` for `top_k <= 0`, `temperature <= 0`, `top_p`
        outside (0, 1] and class labels outside the trained classes (transformers would silently treat `top_k=0`
        as "no top-k").
        """
        config = generation_config if generation_config is not None else self.generation_config
        check_sampling_settings(**{name: kwargs.get(name, getattr(config, name, None))
                                   for name in ("top_k", "temperature", "top_p")})
        if kwargs.get("use_cache") is False:
            kwargs.setdefault("cache_implementation", None)  # no cache: drop the default static one (and its warning)
        if kwargs.get("class_labels") is not None:
            kwargs["class_labels"] = check_class_labels(kwargs["class_labels"], self.config.num_classes).to(self.device)
        if self.config.token_id_ranges is not None or self.config.eos_token_id is not None:
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            # custom processors run before generate's temperature/top-k/top-p warpers
            processors.append(FixedLayoutLogitsProcessor(self.config))
            kwargs["logits_processor"] = processors
        if seed is None:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return super().generate(inputs, generation_config=generation_config, **kwargs)


# ---------------------------------------------------------------------------------------- regression head
@dataclass
class NefGPTWeightRegressionOutput(ModelOutput):
    """Output of [`NefGPTForWeightRegression`]: a Gaussian mixture over each position's chunk.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            negative log-likelihood of the real (unmasked) chunk entries, in nats per weight.
        mixture_logits (`torch.FloatTensor` of shape `(b, t, k)`): unnormalised log mixture weights.
        means (`torch.FloatTensor` of shape `(b, t, k, w)`): component means.
        log_stds (`torch.FloatTensor` of shape `(b, t, k, w)`): component log standard deviations; with full
            covariances, the logs of the Cholesky factor's diagonal.
        scale_tril (`torch.FloatTensor` of shape `(b, t, k, w, w)`, *optional*): with
            `config.mixture_covariance="full"`, each component's lower-triangular Cholesky factor L (covariance
            L Lᵀ; its diagonal is `log_stds.exp()`). `None` with diagonal covariances.
        cache (`Cache`, *optional*): key/value cache.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): per-layer hidden states.
    """

    loss: torch.FloatTensor | None = None
    mixture_logits: torch.FloatTensor | None = None
    means: torch.FloatTensor | None = None
    log_stds: torch.FloatTensor | None = None
    scale_tril: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class NefGPTWeightRegressionHead(nn.Module):
    """Chunks in (a linear projection, plus a learned start vector at position 0), mixture parameters out.

    Per component: a logit, ``w`` means, ``w`` log standard deviations and, with full covariances, the
    ``w(w-1)/2`` entries below the Cholesky factor's diagonal (row by row), in that order: a full head whose
    off-diagonal outputs are zero is the diagonal head.
    """

    def __init__(self, config: NefGPTConfig):
        super().__init__()
        self.chunk_dim, self.num_mixtures = config.chunk_dim, config.num_mixtures
        self.full_covariance = config.mixture_covariance == "full"
        self.min_log_std = float(config.min_log_std)
        self.chunk_proj = nn.Linear(config.chunk_dim, config.hidden_size)
        self.start_embedding = nn.Parameter(torch.empty(config.hidden_size))
        w = config.chunk_dim
        self.num_off_diagonal = w * (w - 1) // 2 if self.full_covariance else 0
        self.mixture_proj = nn.Linear(config.hidden_size, config.num_mixtures * (1 + 2 * w + self.num_off_diagonal))

    def embed(self, chunks: torch.Tensor, prepend_start: bool) -> torch.Tensor:
        embeds = self.chunk_proj(chunks)  # (b, t, d)
        if prepend_start:
            start = self.start_embedding.to(embeds.dtype).expand(chunks.shape[0], 1, -1)
            embeds = torch.cat([start, embeds], dim=1)
        return embeds

    def mixture(self, hidden_states: torch.Tensor):
        """Mixture logits `(b, t, k)`, means and log stds `(b, t, k, w)`, and the Cholesky factors
        `(b, t, k, w, w)` (`None` with diagonal covariances)."""
        b, t, _ = hidden_states.shape
        k, w = self.num_mixtures, self.chunk_dim
        params = self.mixture_proj(hidden_states).float()
        mixture_logits, means, log_stds, off_diagonal = params.split([k, k * w, k * w, k * self.num_off_diagonal],
                                                                     dim=-1)
        means = means.view(b, t, k, w)
        log_stds = log_stds.view(b, t, k, w).clamp(min=self.min_log_std)
        scale_tril = None
        if self.full_covariance:
            rows, cols = torch.tril_indices(w, w, offset=-1, device=params.device)
            below = off_diagonal.new_zeros(b, t, k, w * w)
            below = below.index_copy(-1, rows * w + cols, off_diagonal.view(b, t, k, -1))
            scale_tril = below.view(b, t, k, w, w) + torch.diag_embed(log_stds.exp())
        return mixture_logits, means, log_stds, scale_tril


def masked_scale_tril(scale_tril: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Cholesky factors with the rows and columns of padded entries replaced by the identity's.

    The component's distribution over a chunk's real entries is then N(mean, L_r L_rᵀ), L_r the factor's rows and
    columns of the real entries, whatever sits at the padded ones; the loss and `sample()` both use it.
    Shapes: `scale_tril` `(b, t, k, w, w)`, `mask` `(b or 1, t, w)` bool.
    """
    real = mask[:, :, None, :, None] & mask[:, :, None, None, :]  # (b, t, 1, w, w)
    eye = torch.eye(scale_tril.shape[-1], dtype=scale_tril.dtype, device=scale_tril.device)
    return torch.where(real, scale_tril, eye)


def mixture_nll(mixture_logits, means, log_stds, targets, mask, scale_tril=None) -> torch.Tensor:
    """NLL per real entry of a Gaussian mixture over each chunk; masked entries contribute nothing.

    Shapes: logits `(b, t, k)`, means/log_stds `(b, t, k, w)`, targets `(b, t, w)`, mask `(b or 1, t, w)` bool,
    scale_tril (full covariances; `None`: diagonal ones, the stds `log_stds.exp()`) `(b, t, k, w, w)`.
    """
    if scale_tril is not None:
        # z = L⁻¹ (x - mean) with the padded entries' rows and columns of L the identity's and their
        # differences 0: z is 0 there, and the real entries' z is that of their own factor L_r
        real = mask[:, :, None, :]
        diff = torch.where(real, targets.float()[:, :, None, :] - means, 0.0)
        z = torch.linalg.solve_triangular(masked_scale_tril(scale_tril, mask), diff[..., None], upper=False)[..., 0]
    else:
        z = (targets.float()[:, :, None, :] - means) * torch.exp(-log_stds)
    mask = mask.to(means.dtype)
    log_normal = -0.5 * z.square() - log_stds - 0.5 * math.log(2 * math.pi)  # (b, t, k, w)
    log_chunk = (log_normal * mask[:, :, None, :]).sum(-1)  # (b, t, k)
    log_likelihood = torch.logsumexp(F.log_softmax(mixture_logits, dim=-1) + log_chunk, dim=-1)  # (b, t)
    return -log_likelihood.sum() / (mask.expand_as(targets).sum()).clamp(min=1)


class NefGPTForWeightRegression(NefGPTPreTrainedModel):
    """NefGPT over continuous weight chunks with a Gaussian-mixture head per position, sampled with `sample()`.

    Position 0 holds a learned start vector, position ``i > 0`` the projected chunk ``i - 1``; the output at
    position ``i`` is the mixture over chunk ``i``. Train with ``model(labels=chunks)``: the inputs are then
    ``labels[:, :-1]``, shifted inside as the causal LM shifts its labels.
    """

    def __init__(self, config: NefGPTConfig):
        super().__init__(config)
        self.model = NefGPTModel(config)
        self.head = NefGPTWeightRegressionHead(config)
        self._default_masks: dict[torch.device, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.head.chunk_proj

    def chunk_mask(self, device=None) -> torch.Tensor:
        """`(t, w)` bool: True where a chunk entry is real, from `config.token_chunk_widths` (all True if unset)."""
        device = torch.device(device) if device is not None else self.device
        if device not in self._default_masks:
            t, w = self.config.sequence_length, self.config.chunk_dim
            widths = self.config.token_chunk_widths
            widths = torch.full((t,), w) if widths is None else torch.tensor(widths)
            self._default_masks[device] = (torch.arange(w)[None, :] < widths[:, None]).to(device)
        return self._default_masks[device]

    def forward(
        self,
        chunks: torch.FloatTensor | None = None,
        labels: torch.FloatTensor | None = None,
        chunk_mask: torch.Tensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> NefGPTWeightRegressionOutput | tuple:
        r"""
        Args:
            chunks (`torch.FloatTensor` of shape `(b, n, w)`, *optional*): the chunks fed in. With an empty cache
                the start vector is prepended, so the output has `n + 1` positions; with a cache of length `L`
                they sit at positions `L..L+n-1`. Defaults to `labels[:, :-1]`.
            labels (`torch.FloatTensor` of shape `(b, t, w)`, *optional*): target chunks of whole sequences; the
                loss (NLL per real entry) is computed only when given.
            chunk_mask (`torch.Tensor` of shape `(t, w)` or `(b, t, w)`, *optional*): True where a label entry is
                real; defaults to the widths in `config.token_chunk_widths`.
            class_labels (`torch.LongTensor` of shape `(b,)`, *optional*): see [`NefGPTModel.forward`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if chunks is None:
            if labels is None:
                raise ValueError("NefGPTForWeightRegression.forward needs chunks or labels")
            chunks = labels[:, :-1]
        if chunks.ndim != 3 or chunks.shape[-1] != self.config.chunk_dim:
            raise ValueError(
                f"chunks must have shape (b, n, chunk_dim={self.config.chunk_dim}), got {tuple(chunks.shape)}"
            )
        cache = cache if cache is not None else past_key_values
        past = _cache_length(cache)
        embeds = self.head.embed(chunks.to(self.head.chunk_proj.weight.dtype), prepend_start=past == 0)
        outputs = self.model(
            inputs_embeds=embeds, cache=cache, use_cache=use_cache, class_labels=class_labels,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        mixture_logits, means, log_stds, scale_tril = self.head.mixture(outputs.last_hidden_state)

        loss = None
        if labels is not None:
            if past != 0 or labels.shape != (chunks.shape[0], embeds.shape[1], self.config.chunk_dim):
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} do not match the {embeds.shape[1]} predicted positions "
                    f"(pass whole sequences without a cache: model(labels=chunks))"
                )
            if chunk_mask is None:
                chunk_mask = self.chunk_mask(labels.device)[: labels.shape[1]]
            chunk_mask = chunk_mask.to(device=labels.device, dtype=torch.bool)
            if chunk_mask.ndim == 2:
                chunk_mask = chunk_mask[None]
            if chunk_mask.shape[1:] != labels.shape[1:]:
                raise ValueError(f"chunk_mask of shape {tuple(chunk_mask.shape)} does not fit labels {tuple(labels.shape)}")
            loss = mixture_nll(mixture_logits, means, log_stds, labels, chunk_mask, scale_tril)

        output = NefGPTWeightRegressionOutput(
            loss=loss, mixture_logits=mixture_logits, means=means, log_stds=log_stds, scale_tril=scale_tril,
            cache=_cache_of(outputs),
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 1,
        temperature: float = 1.0,
        seed: int | None = None,
        class_labels: torch.LongTensor | None = None,
        use_cache: bool = True,
        top_k: int | None = None,
    ) -> torch.FloatTensor:
        r"""Sample whole chunk sequences autoregressively (one position per step, with a static KV cache).

        Args:
            num_samples (`int`): number of sequences (fields); with `class_labels`, their length must be 1 or this.
            temperature (`float`, *optional*, defaults to 1.0): > 0; mixture logits are divided by it and the
                standard deviations (Cholesky factors) multiplied by its square root (sketch-rnn), so < 1 is more
                conservative.
            seed (`int`, *optional*): seed of a private generator: same seed, same samples.
            class_labels (`torch.LongTensor` of shape `(b,)` or an `int`, *optional*): classes to sample.
            use_cache (`bool`, *optional*, defaults to `True`): `False` recomputes the prefix every step (slow;
                for benchmarks and equivalence tests).
            top_k (`int`, *optional*): > 0; each position picks its component among the `top_k` most likely
                mixture components only (top-k over components, as `generate()`'s top-k over tokens; `top_k >=
                num_mixtures` keeps them all). `None`: every component.

        Returns: `torch.FloatTensor` of shape `(num_samples, t, chunk_dim)`, padded entries zero.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        check_sampling_settings(top_k=top_k, temperature=temperature)
        if class_labels is not None:
            class_labels = check_class_labels(class_labels, self.config.num_classes, num_samples).to(self.device)
        device, t, w = self.device, self.config.sequence_length, self.config.chunk_dim
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        bool_mask = self.chunk_mask(device)
        mask = bool_mask.float()
        dtype = self.head.chunk_proj.weight.dtype
        samples = torch.zeros(num_samples, t, w, device=device)
        cache = StaticCache(config=self.config, max_cache_len=t) if use_cache else None
        for i in range(t):
            # 1. the mixture at position i, from the start vector and the chunks sampled so far
            if use_cache:
                step_input = samples[:, i - 1 : i] if i > 0 else samples[:, :0]
                out = self(chunks=step_input.to(dtype), cache=cache, use_cache=True, class_labels=class_labels)
            else:
                out = self(chunks=samples[:, :i].to(dtype), use_cache=False, class_labels=class_labels)
            logits, means = out.mixture_logits[:, -1], out.means[:, -1]
            # 2. pick a component per field (among the top_k most likely ones), then draw from its Gaussian
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
                logits = logits.masked_fill(logits < kth, -float("inf"))
            component = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (b, 1)
            index = component[:, :, None].expand(-1, 1, w)
            mean = means.gather(1, index).squeeze(1)  # (b, w)
            noise = torch.randn(mean.shape, generator=generator, device=device)
            if out.scale_tril is None:
                std = out.log_stds[:, -1].gather(1, index).squeeze(1).exp() * math.sqrt(temperature)
                samples[:, i] = (mean + std * noise) * mask[i]
            else:  # L z, L the component's factor with the padded entries' rows and columns the identity's
                factor = masked_scale_tril(out.scale_tril[:, -1:], bool_mask[None, i : i + 1])[:, 0]  # (b, k, w, w)
                factor = factor.gather(1, index[..., None].expand(-1, 1, w, w)).squeeze(1) * math.sqrt(temperature)
                samples[:, i] = (mean + (factor @ noise[..., None])[..., 0]) * mask[i]
        return samples


__all__ = [
    "check_class_labels",
    "check_sampling_settings",
    "check_token_ids",
    "NefGPTPreTrainedModel",
    "NefGPTModel",
    "NefGPTForCausalLM",
    "NefGPTForWeightRegression",
    "NefGPTWeightRegressionOutput",
]
