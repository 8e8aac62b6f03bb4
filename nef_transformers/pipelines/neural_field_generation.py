"""`pipeline("neural-field-generation")`: sample neural fields from a trained NefGPT and render them.

```python
>>> import nef_transformers  # registers the task
>>> from transformers import pipeline
>>> pipe = pipeline("neural-field-generation", model="runs/mnist/nef_gpt")  # doctest: +SKIP
>>> samples = pipe(num_samples=16, top_k=5, temperature=0.8, seed=0)  # doctest: +SKIP
>>> samples[0]["image"].save("sample.png")  # doctest: +SKIP
```

A model folder is what `examples/train.py` writes: ``config.json`` (its ``architectures`` name the head, its
``field_spec`` / ``field_source`` describe the fields), ``model.safetensors`` and the tokenization, a
`NefVQTokenizer` at the folder root for `NefGPTForCausalLM` or a `NeuronChunker` / `NefAutoencoder` / `NefCodeVAE`
in ``tokenizer/`` for `NefGPTForWeightRegression`. `load_generation_folder` loads the pair, `generate_weights`
samples flat weights without the pipeline (what scripts and benchmarks call).

Output: a list with one `NeuralFieldSample` dict per sample, in sampling order:

- ``"weights"``: ``(p,)`` float32 CPU tensor, the field's flat weights in `SirenSpec`'s canonical order;
- ``"spec"``: the `SirenSpec` the weights belong to;
- ``"label"``: the class the sample was conditioned on (`int`), or `None`;
- ``"valid"``: `False` when the weights hold NaN/inf or the field renders empty (a warning counts them);
- by ``output_type``: ``"pil"`` adds ``"image"`` (a `PIL.Image.Image` of the source's height x width, grey or
  RGB, pixel values un-normalised with the source's mean/std and clipped to [0, 1] before the 8-bit
  conversion; `None` when invalid), ``"mesh"`` adds ``"mesh"`` (a `trimesh.Trimesh` from marching cubes at
  occupancy logit 0, or `None` when the field renders empty), ``"points"`` adds ``"points"`` (``(2048, 3)``
  float32 points on that surface, or `None`); ``"weights"`` adds nothing.

Sampling runs in batches of ``batch_size`` fields; batch ``i`` draws with seed ``seed + i``, so a call with a seed
is reproducible (the same seed and batch size give the same fields).

Axis legend: ``b`` fields, ``p`` flat parameters, ``t`` sequence positions, ``w`` chunk width.
"""

from __future__ import annotations

import numbers
import os
from typing import TYPE_CHECKING, Sequence, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, Pipeline, PretrainedConfig
from transformers.utils import logging

from ..fields.render import extract_mesh, occupancy_grid, render_images, sample_point_cloud
from ..fields.spec import SirenSpec
from ..models.nef_gpt import NefGPTForCausalLM, NefGPTForWeightRegression
from ..models.nef_gpt.modeling_nef_gpt import check_sampling_settings
from ..tokenization.chunking import CONFIG_NAME as CHUNKER_CONFIG_NAME
from ..tokenization.chunking import NeuronChunker
from ..tokenization.code import NefCodeVAE
from ..tokenization.learned import NefAutoencoder
from ..tokenization.tokenization_nef_vq import VOCAB_FILES_NAMES, NefVQTokenizer

if TYPE_CHECKING:
    import trimesh
    from PIL import Image

logger = logging.get_logger(__name__)

TASK = "neural-field-generation"
OUTPUT_TYPES = ("pil", "weights", "mesh", "points")
# Fields sampled per batch: the default NefGPT's KV cache for 256 x 197 positions is ~50 MB (4 layers, 1 KV head).
DEFAULT_BATCH_SIZE = 256
# Fields evaluated at once on the marching-cubes lattice: 8 fields x 65,536 points per chunk x 48 hidden units is
# ~100 MB per activation.
MESH_FIELDS_PER_BATCH = 8
NUM_POINTS = 2048
HEAD_CLASSES = {cls.__name__: cls for cls in (NefGPTForCausalLM, NefGPTForWeightRegression)}
# Hub/file arguments that may go to `AutoConfig.from_pretrained` (not dtype, device_map...: those would become
# config attributes).
CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "_commit_hash")


class NeuralFieldSample(TypedDict, total=False):
    """One generated field (see the module docstring)."""

    weights: torch.Tensor
    spec: SirenSpec
    label: int | None
    valid: bool
    image: Image.Image | None
    mesh: trimesh.Trimesh | None
    points: np.ndarray | None


# ------------------------------------------------------------------------------------------- loading
def head_class(config: PretrainedConfig) -> type:
    """The NefGPT head class a config's ``architectures`` names; a `ValueError` unless it names exactly one."""
    names = [name for name in (getattr(config, "architectures", None) or []) if name in HEAD_CLASSES]
    if len(names) != 1:
        raise ValueError(
            f"config.json names the architectures {getattr(config, 'architectures', None)}; the "
            f"{TASK} pipeline needs exactly one of {sorted(HEAD_CLASSES)} (save_pretrained records it)"
        )
    return HEAD_CLASSES[names[0]]


class AutoModelForNeuralFieldGeneration:
    """Loads a saved NefGPT with the head its ``config.json`` names in ``architectures``.

    The pipeline's model class (`pt_model` of the registration): `AutoModelForCausalLM` alone would load a
    regression checkpoint as a `NefGPTForCausalLM` (its token embedding and tied LM head exist in both heads) and
    drop the mixture head's weights with only a log line. Weights the chosen head lacks, or that it does not use,
    raise an `OSError`.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        path = pretrained_model_name_or_path
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            if os.path.isdir(path) and not os.path.isfile(os.path.join(path, kwargs.get("subfolder", ""), "config.json")):
                raise OSError(f"{path} has no config.json: not a saved NefGPT (examples/train.py writes config.json, "
                              "model.safetensors and the tokenizer)")
            config = AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs})
        model_class = head_class(config)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = model_class.from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        unexpected = sorted(info.get("unexpected_keys", ()))
        if unexpected:
            raise OSError(
                f"the checkpoint in {path} holds {len(unexpected)} weights that {model_class.__name__} does not use "
                f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}): config.json's architectures "
                f"{config.architectures} do not match the saved head"
            )
        return (model, info) if wants_info else model


def find_tokenization(folder: str | os.PathLike):
    """The tokenization saved with a model: a `NefVQTokenizer` at the folder root, else a `NeuronChunker` or a
    `NefAutoencoder` or `NefCodeVAE` in ``tokenizer/`` (or one of them directly in ``folder``, when it is a tokenizer
    folder).

    Raises a `FileNotFoundError` naming the folder and the files it looked for.
    """
    from ..tokenization.train import load_tokenization

    folder = os.fspath(folder)
    try:
        return load_tokenization(folder)
    except FileNotFoundError:
        pass
    raise FileNotFoundError(
        f"{folder} holds no tokenizer: expected a NefVQTokenizer at its root (tokenizer_config.json + "
        f"{VOCAB_FILES_NAMES['codebook_file']}) or, for a regression model, a tokenizer/ folder with a NeuronChunker "
        f"({CHUNKER_CONFIG_NAME}), a NefAutoencoder or a NefCodeVAE (config.json + model.safetensors); "
        "examples/train.py saves it there, or pass tokenizer= to the pipeline"
    )


def load_generation_folder(folder: str | os.PathLike, **model_kwargs):
    """``(model, tokenization)`` of a folder written by `examples/train.py` (or `save_pretrained`).

    The head comes from ``config.json``'s ``architectures`` (`AutoModelForNeuralFieldGeneration`), the tokenization
    from `find_tokenization`; ``model_kwargs`` go to `from_pretrained` (``dtype``, ``device_map``...). The model is
    in eval mode; a tokenization that does not fit it raises a `ValueError`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder (expected a NefGPT model folder from examples/train.py)")
    model = AutoModelForNeuralFieldGeneration.from_pretrained(folder, **model_kwargs).eval()
    tokenization = find_tokenization(folder)
    check_tokenization(model, tokenization)
    return model, tokenization


# ---------------------------------------------------------------------------------------------- checks
def tokenization_spec(tokenization) -> SirenSpec:
    """The `SirenSpec` of the fields a tokenization decodes to."""
    if isinstance(tokenization, NefVQTokenizer):
        return tokenization.siren_spec
    if isinstance(tokenization, (NeuronChunker, NefAutoencoder, NefCodeVAE)):
        return tokenization.spec
    raise TypeError(f"expected a NefVQTokenizer, NeuronChunker, NefAutoencoder or NefCodeVAE, got "
                    f"{type(tokenization).__name__}")


def check_tokenization(model, tokenization) -> None:
    """Raise a `ValueError` unless ``tokenization`` decodes what ``model`` samples: a `NefVQTokenizer` of the same
    vocabulary and sequence layout for `NefGPTForCausalLM`; a `NeuronChunker`, `NefAutoencoder` or `NefCodeVAE` with
    ``(t, w)`` = ``(sequence_length, chunk_dim)`` for `NefGPTForWeightRegression`; the spec of
    ``config.field_spec``."""
    config = model.config
    if isinstance(model, NefGPTForCausalLM):
        if not isinstance(tokenization, NefVQTokenizer):
            raise ValueError(f"a NefGPTForCausalLM samples VQ token ids and needs a NefVQTokenizer to decode them, got "
                             f"{type(tokenization).__name__}")
        config.check_tokenizer(tokenization)
        if config.sequence_length != tokenization.sequence_length:
            raise ValueError(f"the model samples sequences of {config.sequence_length} ids but the tokenizer's fields "
                             f"take {tokenization.sequence_length}")
    elif isinstance(model, NefGPTForWeightRegression):
        if isinstance(tokenization, NeuronChunker):
            shape = (tokenization.num_chunks, tokenization.chunk_width)
        elif isinstance(tokenization, NefAutoencoder):
            shape = (tokenization.num_tokens, tokenization.config.latent_dim)
        elif isinstance(tokenization, NefCodeVAE):
            shape = (tokenization.num_tokens, tokenization.chunk_width)
        else:
            raise ValueError(f"a NefGPTForWeightRegression samples continuous chunks and needs a NeuronChunker, "
                             f"NefAutoencoder or NefCodeVAE to decode them, got {type(tokenization).__name__}")
        if shape != (config.sequence_length, config.chunk_dim):
            raise ValueError(f"the model samples (t, w) = ({config.sequence_length}, {config.chunk_dim}) chunks but the "
                             f"{type(tokenization).__name__} decodes {shape}")
    else:
        raise TypeError(f"expected a NefGPTForCausalLM or NefGPTForWeightRegression, got {type(model).__name__}")
    spec = tokenization_spec(tokenization)
    if config.field_spec is not None and SirenSpec.from_dict(dict(config.field_spec)) != spec:
        raise ValueError(f"config.field_spec is {SirenSpec.from_dict(dict(config.field_spec))} but the tokenization "
                         f"decodes {spec}")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def resolve_labels(label, num_samples: int, config) -> torch.Tensor | None:
    """``label`` (one int, or one int per sample) as a ``(num_samples,)`` long tensor; `None` stays `None`."""
    if label is None:
        return None
    if config.num_classes == 0:
        raise ValueError(f"label={label!r} was given but this model is unconditional (config.num_classes = 0): it "
                         "cannot be asked for a class; pass label=None")
    try:
        values = torch.as_tensor(label)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.dtype == torch.bool or values.is_floating_point() or values.is_complex() \
            or values.ndim > 1:
        raise ValueError(f"label must be an int or a sequence of ints (one per sample), got {label!r}")
    values = values.long().expand(num_samples) if values.ndim == 0 else values.long()
    if values.numel() != num_samples:
        raise ValueError(f"label holds {values.numel()} labels for num_samples={num_samples}: give one int for every "
                         "sample or one label per sample")
    bad = values[(values < 0) | (values >= config.num_classes)]
    if bad.numel():
        names = (config.field_source or {}).get("class_names") or []
        known = f" ({', '.join(f'{i}: {n}' for i, n in enumerate(names))})" if names else ""
        raise ValueError(f"label {int(bad[0])} is outside the classes of this model: 0..{config.num_classes - 1}{known}")
    return values.clone()


# -------------------------------------------------------------------------------------------- sampling
def _sample_batch(model, num: int, top_k, temperature: float, seed: int | None, labels) -> torch.Tensor:
    """One batch of raw samples: ``(b, t)`` token ids (causal LM) or ``(b, t, w)`` chunks (regression)."""
    if labels is not None:
        labels = labels.to(model.device)
    if isinstance(model, NefGPTForCausalLM):
        size = {"class_labels": labels} if labels is not None else {"num_return_sequences": num}
        return model.generate(do_sample=True, top_k=top_k, temperature=temperature, seed=seed, **size)
    return model.sample(num, temperature=temperature, seed=seed, class_labels=labels, top_k=top_k)


def _decode_batch(tokenization, values: torch.Tensor) -> torch.Tensor:
    """Raw samples -> ``(b, p)`` float32 CPU weights."""
    if isinstance(tokenization, NefVQTokenizer):
        weights = tokenization.decode_weights(values)
    elif isinstance(tokenization, (NefAutoencoder, NefCodeVAE)):
        device = tokenization.scale.device
        weights = tokenization.decode(values.to(device=device, dtype=torch.float32))
    else:
        weights = tokenization.from_chunks(values.float())
    return weights.detach().float().cpu()


@torch.no_grad()
def generate_weights(
    model,
    tokenization,
    num_samples: int,
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    seed: int | None = None,
    label: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    return_sequences: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Sample ``num_samples`` fields and decode them to flat weights, without the pipeline.

    Args:
        model (`NefGPTForCausalLM` or `NefGPTForWeightRegression`): the generator, on any device.
        tokenization (`NefVQTokenizer`, `NeuronChunker`, `NefAutoencoder` or `NefCodeVAE`): what decodes its samples
            (`check_tokenization`).
        num_samples (`int`): number of fields.
        top_k (`int`, *optional*): sample among the `top_k` most likely tokens (causal LM) or mixture components
            (regression) only; `None`: no top-k filter. The model's saved `generation_config` defaults (top-k 5,
            temperature 0.8) are not applied here: pass them, or use the pipeline, which does.
        temperature (`float`, *optional*, defaults to 1.0): > 0; below 1 is more conservative.
        seed (`int`, *optional*): batch `i` samples with seed `seed + i` (reproducible); `None` uses torch's global RNG.
        label (`int` or sequence of `int`, *optional*): class of every sample, or one class per sample, for a
            class-conditional model.
        batch_size (`int`, *optional*, defaults to 256): fields sampled at once.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over batches when there is more than one.
        return_sequences (`bool`, *optional*, defaults to `False`): also return what the model sampled before
            decoding (token ids, or chunks: a `NefAutoencoder`'s latents, a `NefCodeVAE`'s codes), on the CPU.

    Returns: `torch.FloatTensor` of shape `(num_samples, p)` on the CPU, canonical flat SIREN weights (unchecked:
    a sample may hold NaN or inf, see the pipeline's ``"valid"``); with ``return_sequences``, ``(weights,
    sequences)``.
    """
    check_tokenization(model, tokenization)
    num_samples = _check_positive_int("num_samples", num_samples)
    batch_size = _check_positive_int("batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size)
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    check_sampling_settings(top_k=top_k, temperature=temperature)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
    labels = resolve_labels(label, num_samples, model.config)
    starts = range(0, num_samples, batch_size)
    was_training = model.training
    model.eval()
    outputs, sequences = [], []
    try:
        for index, start in enumerate(tqdm(starts, desc="sampling fields", unit="batch",
                                           disable=not progress or len(starts) <= 1)):
            num = min(batch_size, num_samples - start)
            values = _sample_batch(model, num, top_k, float(temperature), None if seed is None else int(seed) + index,
                                   None if labels is None else labels[start:start + num])
            outputs.append(_decode_batch(tokenization, values))
            if return_sequences:
                sequences.append(values.cpu())
    finally:
        model.train(was_training)
    return (torch.cat(outputs), torch.cat(sequences)) if return_sequences else torch.cat(outputs)


# ---------------------------------------------------------------------------------------------- pipeline
def _to_pil(image: np.ndarray):
    """``(H, W, C)`` floats in [0, 1] -> an 8-bit grey (C = 1) or RGB (C = 3) `PIL.Image.Image`."""
    from PIL import Image

    pixels = np.round(image * 255.0).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


class NeuralFieldGenerationPipeline(Pipeline):
    r"""Sample neural fields from a NefGPT and render them (task ``"neural-field-generation"``).

    Build it with `transformers.pipeline("neural-field-generation", model=folder)` after ``import
    nef_transformers``, or with ``model=<NefGPT instance>, tokenizer=<tokenization or its folder>``; without
    ``tokenizer`` the tokenization is read from the model's folder (`find_tokenization`). ``device=`` moves the
    model, and rendering runs on the same device.

    Call it with keyword options only (defaults can also be given when building it):

    - ``num_samples`` (`int`, defaults to 1): fields to generate;
    - ``top_k`` (`int`), ``temperature`` (`float`): defaults from the model's `generation_config` (top-k 5,
      temperature 0.8 for a trained causal LM), else no top-k and 1.0; see `generate_weights`;
    - ``seed`` (`int`), ``label`` (`int` or one per sample), ``batch_size`` (`int`, defaults to 256): see
      `generate_weights`;
    - ``output_type`` (`str`, defaults to ``"pil"`` for image fields and ``"mesh"`` for 3D ones): ``"pil"``,
      ``"weights"``, ``"mesh"`` or ``"points"``;
    - ``resolution`` (`int`, defaults to 64): marching-cubes lattice per axis for ``"mesh"`` and ``"points"``.

    Returns a list of `NeuralFieldSample` dicts (see the module docstring).
    """

    _load_tokenizer = False  # the tokenization is read by `find_tokenization`: AutoTokenizer misses chunkers
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    CALL_OPTIONS = ("num_samples", "top_k", "temperature", "seed", "label", "output_type", "batch_size", "resolution")

    def __init__(self, model, tokenizer=None, **kwargs):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = find_tokenization(tokenizer)
        elif tokenizer is None:
            folder = getattr(model, "name_or_path", None)
            if not folder or not os.path.isdir(folder):
                raise ValueError(f"the {TASK} pipeline needs the model's tokenization: pass tokenizer= (a "
                                 "NefVQTokenizer, NeuronChunker, NefAutoencoder or NefCodeVAE, or its folder) or a "
                                 "model folder that holds it")
            tokenizer = find_tokenization(folder)
        check_tokenization(model, tokenizer)
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)

    @property
    def spec(self) -> SirenSpec:
        return tokenization_spec(self.tokenizer)

    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.CALL_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; it takes {list(self.CALL_OPTIONS)}")
        return kwargs, {}, {}

    def __call__(self, inputs=None, **kwargs) -> list[NeuralFieldSample]:
        """Generate fields; every option is a keyword (see the class docstring)."""
        if inputs is not None:
            raise ValueError(f"the {TASK} pipeline takes no inputs, only keyword options (e.g. num_samples=16), got "
                             f"{inputs!r}")
        options, _, _ = self._sanitize_parameters(**kwargs)
        defaults = dict(self._preprocess_params)
        if self._batch_size is not None:  # Pipeline.__init__ keeps a construction-time batch_size apart
            defaults.setdefault("batch_size", self._batch_size)
        plan = self.preprocess(None, **{**defaults, **options})
        weights = self.forward(plan)
        return self.postprocess(weights, output_type=plan["output_type"], labels=plan["labels"],
                                batch_size=plan["batch_size"], resolution=plan["resolution"], seed=plan["seed"])

    # 1. validate the options and fill in their defaults, before any sampling
    def preprocess(self, input_=None, **options) -> dict:
        spec, source = self.spec, self.model.config.field_source
        output_type = options.get("output_type") or ("mesh" if spec.in_dim == 3 else "pil")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        kind = (source or {}).get("kind")
        if output_type == "pil":
            if spec.in_dim != 2 or kind == "occupancy":
                raise ValueError(f"output_type='pil' renders image fields, but this model generates {spec.in_dim}D "
                                 f"fields (field_source kind {kind!r}): use output_type='mesh', 'points' or 'weights'")
            if source is None:
                raise ValueError("output_type='pil' needs model.config.field_source (kind 'image', image_shape, mean, "
                                 "std), which examples/train.py records from the dataset; this model has none: use "
                                 "output_type='weights' or set config.field_source")
            missing = [key for key in ("image_shape", "mean", "std") if key not in source]
            if missing:
                raise ValueError(f"output_type='pil' needs {missing} in model.config.field_source, which has "
                                 f"{sorted(source)}")
            channels = source["image_shape"][-1]
            if channels != spec.out_dim:
                raise ValueError(f"field_source image_shape {source['image_shape']} has {channels} channels but the "
                                 f"fields output {spec.out_dim} values ({spec})")
            if channels not in (1, 3) or len(source["mean"]) != channels or len(source["std"]) != channels:
                raise ValueError(f"field_source image_shape {source['image_shape']}, mean {source['mean']} and std "
                                 f"{source['std']} do not describe a grey or RGB image (1 or 3 channels, one mean and "
                                 "std per channel)")
        elif output_type in ("mesh", "points") and (spec.in_dim != 3 or kind == "image"):
            raise ValueError(f"output_type={output_type!r} renders 3D occupancy fields, but this model generates "
                             f"{spec.in_dim}D fields (field_source kind {kind!r}): use output_type='pil' or 'weights'")
        generation_config = getattr(self.model, "generation_config", None)
        top_k = options["top_k"] if "top_k" in options else getattr(generation_config, "top_k", None)
        temperature = options.get("temperature")
        if temperature is None:
            temperature = getattr(generation_config, "temperature", None) or 1.0
        num_samples = _check_positive_int("num_samples", options.get("num_samples", 1))
        batch_size = options.get("batch_size")
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else _check_positive_int("batch_size", batch_size)
        resolution = _check_positive_int("resolution", options.get("resolution", 64))
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2 (lattice points per axis), got {resolution}")
        labels = resolve_labels(options.get("label"), num_samples, self.model.config)
        check_sampling_settings(top_k=top_k, temperature=temperature)
        return {"num_samples": num_samples, "top_k": top_k, "temperature": temperature, "seed": options.get("seed"),
                "labels": labels, "batch_size": batch_size,
                "output_type": output_type, "resolution": resolution}

    # 2. sample and decode the weights
    def _forward(self, plan: dict) -> torch.Tensor:
        return generate_weights(
            self.model, self.tokenizer, plan["num_samples"], top_k=plan["top_k"], temperature=plan["temperature"],
            seed=plan["seed"], label=plan["labels"], batch_size=plan["batch_size"],
        )

    # 3. render, flag invalid fields, one dict per sample
    def postprocess(self, weights: torch.Tensor, output_type: str = "weights", labels: torch.Tensor | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, resolution: int = 64,
                    seed: int | None = None) -> list[NeuralFieldSample]:
        spec = self.spec
        finite = torch.isfinite(weights).all(dim=1)  # (b,)
        rendered: list = [None] * len(weights)
        if output_type == "pil":
            rendered = self._render_images(weights, finite, batch_size)
        elif output_type in ("mesh", "points"):
            rendered = self._render_meshes(weights, finite, resolution)
            if output_type == "points":
                base = 0 if seed is None else int(seed)
                rendered = [None if mesh is None else sample_point_cloud(mesh, NUM_POINTS, base + i)
                            for i, mesh in enumerate(rendered)]
        samples = []
        for i in range(len(weights)):
            valid = bool(finite[i]) and (output_type == "weights" or rendered[i] is not None)
            sample = NeuralFieldSample(weights=weights[i], spec=spec,
                                       label=None if labels is None else int(labels[i]), valid=valid)
            if output_type != "weights":
                sample["image" if output_type == "pil" else output_type] = rendered[i]
            samples.append(sample)
        self._warn_invalid(samples, int((~finite).sum()), output_type)
        return samples

    def _render_images(self, weights: torch.Tensor, finite: torch.Tensor, batch_size: int) -> list:
        source = self.model.config.field_source
        images: list = [None] * len(weights)
        indices = torch.nonzero(finite).flatten().tolist()
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            pixels = render_images(self.spec, weights[chunk].to(self.device), source["image_shape"], source["mean"],
                                   source["std"])  # (b, H, W, C)
            for index, image in zip(chunk, pixels):
                images[index] = _to_pil(image) if np.isfinite(image).all() else None
        return images

    def _render_meshes(self, weights: torch.Tensor, finite: torch.Tensor, resolution: int) -> list:
        meshes: list = [None] * len(weights)
        indices = torch.nonzero(finite).flatten().tolist()
        starts = range(0, len(indices), MESH_FIELDS_PER_BATCH)
        for start in tqdm(starts, desc="extracting meshes", unit="batch", disable=len(starts) <= 1):
            chunk = indices[start:start + MESH_FIELDS_PER_BATCH]
            with torch.no_grad():
                grids = occupancy_grid(self.spec, weights[chunk].to(self.device), resolution)  # (b, r, r, r)
            for index, grid in zip(chunk, grids):
                meshes[index] = extract_mesh(grid)
        return meshes

    @staticmethod
    def _warn_invalid(samples: list, non_finite: int, output_type: str) -> None:
        invalid = sum(not sample["valid"] for sample in samples)
        if invalid:
            empty = invalid - non_finite
            what = "render empty (no surface at occupancy logit 0)" if output_type in ("mesh", "points") \
                else "render to non-finite pixels"
            logger.warning("%d of %d generated fields are invalid (\"valid\": False): %d with NaN/inf weights, %d %s",
                           invalid, len(samples), non_finite, empty, what)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the folder `load_generation_folder` reads: the model, and its tokenization at the root (VQ) or in
        ``tokenizer/`` (a chunker, autoencoder or code VAE, whose ``config.json`` would overwrite the model's)."""
        self.model.save_pretrained(save_directory, **kwargs)
        vq = isinstance(self.tokenizer, NefVQTokenizer)
        self.tokenizer.save_pretrained(save_directory if vq else os.path.join(save_directory, "tokenizer"))


__all__ = [
    "AutoModelForNeuralFieldGeneration",
    "NeuralFieldGenerationPipeline",
    "NeuralFieldSample",
    "OUTPUT_TYPES",
    "TASK",
    "check_tokenization",
    "generate_weights",
    "load_generation_folder",
    "find_tokenization",
]
