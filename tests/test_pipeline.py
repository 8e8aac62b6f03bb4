"""pipeline("neural-field-generation"): equivalences first (pipeline = generate_weights = generate + decode, seeds
reproduce), then rendering (image shape and range, meshes, empty and NaN fields counted), then the errors users get.

Tiny real objects throughout: a 2->8->8->1 SIREN, a per-neuron VQ tokenizer (17 codes per field) or a naive
chunker, 16-wide one-layer NefGPTs saved with save_pretrained."""

import json
import logging
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as conftest.py: no hub calls; set before transformers is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import pipeline  # noqa: E402

import nef_transformers  # noqa: E402,F401  (registers the task)
from nef_transformers.fields.render import render_images  # noqa: E402
from nef_transformers.fields.siren import siren_init  # noqa: E402
from nef_transformers.fields.spec import SirenSpec  # noqa: E402
from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForCausalLM, NefGPTForWeightRegression  # noqa: E402
from nef_transformers.pipelines import (  # noqa: E402
    TASK,
    NeuralFieldGenerationPipeline,
    generate_weights,
    load_generation_folder,
)
from nef_transformers.tokenization import NefAutoencoder, NefAutoencoderConfig, NeuronChunker  # noqa: E402
from nef_transformers.tokenization.train import VQTokenizerConfig, train_vq_tokenizer  # noqa: E402

SPEC = SirenSpec(in_dim=2, out_dim=1, hidden_dim=8, num_layers=3)  # 105 parameters, 17 neurons
SPEC_3D = SirenSpec(in_dim=3, out_dim=1, hidden_dim=8, num_layers=2)  # 41 parameters, 9 neurons
IMAGE_SOURCE = {"kind": "image", "name": "tiny", "image_shape": [6, 5, 1], "mean": [0.5], "std": [0.25],
                "class_names": ["zero", "one", "two"]}
SHAPE_SOURCE = {"kind": "occupancy", "name": "tiny-shapes", "class_names": []}
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def fields(spec: SirenSpec, num: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    init = siren_init(spec, 1, generator=generator)[0]
    return init, init + 0.05 * torch.randn(num, spec.num_params, generator=generator)


def lm_for(tokenizer, **overrides) -> NefGPTForCausalLM:
    structure = tokenizer.structure_ids()
    config = NefGPTConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.sequence_length, **TINY,
        token_layer_ids=structure["layer_ids"].tolist(), token_neuron_ids=structure["neuron_ids"].tolist(),
        token_level_ids=structure["level_ids"].tolist(), token_id_ranges=tokenizer.token_id_ranges().tolist(),
        **{"field_spec": SPEC.to_dict(), "field_source": IMAGE_SOURCE, **overrides},
    )
    torch.manual_seed(0)
    return NefGPTForCausalLM(config).eval()


def regression_for(chunker: NeuronChunker, source: dict, chunk_dim: int | None = None, **overrides):
    config = NefGPTConfig(
        max_position_embeddings=chunker.num_chunks, chunk_dim=chunk_dim or chunker.chunk_width, num_mixtures=3, **TINY,
        token_layer_ids=[int(v) + 1 for v in chunker.layer_ids], token_neuron_ids=[int(v) + 1 for v in chunker.neuron_ids],
        token_chunk_widths=None if chunk_dim else chunker.widths.tolist(), field_spec=chunker.spec.to_dict(),
        field_source=source, **overrides,
    )
    torch.manual_seed(0)
    return NefGPTForWeightRegression(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    init, weights = fields(SPEC)
    config = VQTokenizerConfig(chunking="neuron", levels=1, codebook_size=8, codebook_grouping="per_layer",
                               batch_size=512)
    return train_vq_tokenizer(weights, SPEC, init, config, progress=False)[0]


@pytest.fixture(scope="module")
def lm_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vq_lm")
    lm_for(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_regression(folder, chunker: NeuronChunker, source: dict, **overrides):
    regression_for(chunker, source, **overrides).save_pretrained(folder)
    chunker.save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def regression_folder(tmp_path_factory):
    init, _ = fields(SPEC)
    return save_regression(tmp_path_factory.mktemp("naive"), NeuronChunker(SPEC, init, "neuron"), IMAGE_SOURCE)


@pytest.fixture(scope="module")
def shape_folder(tmp_path_factory):
    init, _ = fields(SPEC_3D)
    return save_regression(tmp_path_factory.mktemp("shapes"), NeuronChunker(SPEC_3D, init, "neuron"), SHAPE_SOURCE)


def stacked(samples) -> torch.Tensor:
    return torch.stack([sample["weights"] for sample in samples])


# ------------------------------------------------------------------------------------------- equivalences
def test_vq_pipeline_equals_generate_weights_and_manual_decoding(lm_folder):
    pipe = pipeline(TASK, model=str(lm_folder))
    assert isinstance(pipe, NeuralFieldGenerationPipeline) and type(pipe.model) is NefGPTForCausalLM
    options = dict(num_samples=5, top_k=3, temperature=0.9, seed=7, batch_size=2)
    samples = pipe(output_type="weights", **options)
    assert len(samples) == 5 and all(set(s) == {"weights", "spec", "label", "valid"} for s in samples)
    assert all(s["spec"] == SPEC and s["label"] is None and s["valid"] for s in samples)
    weights = stacked(samples)
    assert weights.dtype == torch.float32 and weights.shape == (5, SPEC.num_params) and weights.device.type == "cpu"

    model, tokenizer = load_generation_folder(lm_folder)
    assert torch.equal(weights, generate_weights(model, tokenizer, **options))
    same, ids = generate_weights(model, tokenizer, **options, return_sequences=True)
    assert torch.equal(same, weights) and torch.equal(tokenizer.decode_weights(ids), weights)
    # batches of 2, 2, 1 with seeds 7, 8, 9
    manual = torch.cat([
        tokenizer.decode_weights(model.generate(num_return_sequences=n, seed=7 + i, do_sample=True, top_k=3,
                                                temperature=0.9))
        for i, n in enumerate((2, 2, 1))
    ])
    assert torch.equal(weights, manual)
    assert torch.equal(weights, stacked(pipe(output_type="weights", **options))), "same seed, same fields"
    assert not torch.equal(weights, stacked(pipe(output_type="weights", **{**options, "seed": 8})))
    assert not torch.equal(weights[0], weights[1]), "the fields of one call differ"


def test_regression_pipeline_equals_generate_weights_and_manual_decoding(regression_folder):
    pipe = pipeline(TASK, model=str(regression_folder))
    assert type(pipe.model) is NefGPTForWeightRegression and isinstance(pipe.tokenizer, NeuronChunker)
    options = dict(num_samples=3, top_k=2, temperature=0.7, seed=3)
    weights = stacked(pipe(output_type="weights", **options))
    model, chunker = load_generation_folder(regression_folder)
    assert torch.equal(weights, generate_weights(model, chunker, **options))
    chunks = model.sample(3, temperature=0.7, seed=3, top_k=2)
    manual = chunker.from_chunks(chunks)
    assert torch.equal(weights, manual)
    # what the model sampled comes back beside the weights, in the same batches and seeds
    with_sequences, sequences = generate_weights(model, chunker, **options, batch_size=2, return_sequences=True)
    assert torch.equal(with_sequences, chunker.from_chunks(sequences)) and sequences.shape == chunks.shape
    assert torch.equal(sequences[:2], model.sample(2, temperature=0.7, seed=3, top_k=2))
    assert torch.equal(weights, stacked(pipe(output_type="weights", **options)))
    assert not torch.equal(weights, stacked(pipe(output_type="weights", **{**options, "seed": 4})))


def test_full_covariance_regression_folder_samples_through_the_pipeline(tmp_path):
    """Neuron chunks of several widths (padded) under a full-covariance head: the pipeline's fields are the
    model's samples decoded, padding stays zero, and the loaded model keeps its covariance."""
    init, _ = fields(SPEC)
    chunker = NeuronChunker(SPEC, init, "neuron")
    folder = save_regression(tmp_path / "full", chunker, IMAGE_SOURCE, mixture_covariance="full")
    pipe = pipeline(TASK, model=str(folder))
    assert pipe.model.config.mixture_covariance == "full" and pipe.model.head.full_covariance
    weights = stacked(pipe(output_type="weights", num_samples=4, top_k=2, temperature=0.8, seed=5))
    chunks = pipe.model.sample(4, temperature=0.8, seed=5, top_k=2)
    assert torch.equal(weights, chunker.from_chunks(chunks)) and torch.isfinite(weights).all()
    assert (chunks[~pipe.model.chunk_mask().expand_as(chunks)] == 0).all()
    assert len(set(chunker.widths.tolist())) > 1, "the test needs padded chunks"


def test_learned_embedding_folder_and_save_pretrained_round_trip(tmp_path):
    init, _ = fields(SPEC)
    torch.manual_seed(0)
    autoencoder = NefAutoencoder(NefAutoencoderConfig(spec=SPEC.to_dict(), latent_dim=4, hidden_size=8, num_heads=2),
                                 init).eval()
    model = regression_for(autoencoder.chunker, IMAGE_SOURCE, chunk_dim=4)
    pipe = pipeline(TASK, model=model, tokenizer=autoencoder)
    weights = stacked(pipe(num_samples=3, seed=5, output_type="weights"))
    with torch.no_grad():
        assert torch.equal(weights, autoencoder.decode(model.sample(3, seed=5)))
    # the autoencoder's own config.json goes to tokenizer/, next to (not over) the model's
    pipe.save_pretrained(tmp_path)
    reloaded = pipeline(TASK, model=str(tmp_path))
    assert isinstance(reloaded.tokenizer, NefAutoencoder) and type(reloaded.model) is NefGPTForWeightRegression
    assert torch.equal(stacked(reloaded(num_samples=3, seed=5, output_type="weights")), weights)


def test_model_instance_with_tokenizer_labels_and_device(tokenizer):
    model = lm_for(tokenizer, num_classes=3)
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu")
    assert pipe.device == torch.device("cpu") and pipe.model.device == torch.device("cpu")
    samples = pipe(num_samples=4, label=[0, 2, 1, 2], seed=0, output_type="weights")
    assert [s["label"] for s in samples] == [0, 2, 1, 2]
    manual = tokenizer.decode_weights(model.generate(class_labels=torch.tensor([0, 2, 1, 2]), seed=0, do_sample=True,
                                                     top_k=5, temperature=0.8))
    assert torch.equal(stacked(samples), manual), "pipeline defaults are the model's generation_config (top-k 5, 0.8)"
    assert [s["label"] for s in pipe(num_samples=2, label=1, output_type="weights")] == [1, 1]
    with pytest.raises(ValueError, match=r"label 3 is outside the classes of this model: 0\.\.2 \(0: zero, 1: one"):
        pipe(num_samples=2, label=3)
    with pytest.raises(ValueError, match="label holds 2 labels for num_samples=3"):
        generate_weights(model, tokenizer, 3, label=[0, 1])


# ----------------------------------------------------------------------------------------------- rendering
def test_images_have_the_source_shape_and_range(lm_folder):
    pipe = pipeline(TASK, model=str(lm_folder))
    samples = pipe(num_samples=3, seed=1)  # output_type defaults to "pil" for an image field
    weights = stacked(samples)
    expected = render_images(SPEC, weights, IMAGE_SOURCE["image_shape"], IMAGE_SOURCE["mean"], IMAGE_SOURCE["std"])
    assert expected.min() >= 0.0 and expected.max() <= 1.0
    for sample, image in zip(samples, expected):
        assert sample["valid"] and sample["image"].mode == "L" and sample["image"].size == (5, 6)  # (W, H)
        pixels = np.asarray(sample["image"])
        assert pixels.shape == (6, 5)
        np.testing.assert_array_equal(pixels, np.round(image[..., 0] * 255).astype(np.uint8))


def test_meshes_points_and_empty_or_nan_fields_are_counted(shape_folder, caplog):
    pipe = pipeline(TASK, model=str(shape_folder))
    samples = pipe(num_samples=3, seed=0, resolution=16)  # output_type defaults to "mesh" for a 3D field
    import trimesh

    for sample in samples:
        assert sample["spec"] == SPEC_3D
        assert (sample["mesh"] is None and not sample["valid"]) or (
            isinstance(sample["mesh"], trimesh.Trimesh) and sample["valid"])

    # hand-made fields: logit sin(x) (a surface at x = 0), constant -1 (empty), NaN weights
    plane = torch.zeros(SPEC_3D.num_params)
    params = SPEC_3D.unflatten(plane[None])
    params["layers.0.weight"][0, 0, 0] = 1.0 / SPEC_3D.omega_0
    params["layers.1.weight"][0, 0, 0] = 1.0
    empty = torch.zeros(SPEC_3D.num_params)
    SPEC_3D.unflatten(empty[None])["layers.1.bias"][0, 0] = -1.0
    broken = torch.full((SPEC_3D.num_params,), float("nan"))
    weights = torch.stack([plane, empty, broken])
    with caplog.at_level(logging.WARNING):
        meshes = pipe.postprocess(weights, output_type="mesh", resolution=16)
    assert [s["valid"] for s in meshes] == [True, False, False]
    assert isinstance(meshes[0]["mesh"], trimesh.Trimesh) and meshes[1]["mesh"] is None and meshes[2]["mesh"] is None
    assert np.allclose(meshes[0]["mesh"].vertices[:, 0], 0.0, atol=0.04), "the surface of sin(x) is the plane x = 0"
    assert "2 of 3 generated fields are invalid" in caplog.text and "1 with NaN/inf weights, 1 render empty" in caplog.text
    points = pipe.postprocess(weights, output_type="points", resolution=16, seed=0)
    assert points[0]["points"].shape == (2048, 3) and points[0]["points"].dtype == np.float32
    assert points[1]["points"] is None and points[2]["points"] is None and not points[2]["valid"]


def test_nan_weights_are_reported_invalid_for_images_and_weights(lm_folder, caplog):
    pipe = pipeline(TASK, model=str(lm_folder))
    weights = torch.zeros(2, SPEC.num_params)
    weights[1, 4] = float("inf")
    with caplog.at_level(logging.WARNING):
        images = pipe.postprocess(weights, output_type="pil")
        plain = pipe.postprocess(weights, output_type="weights")
    assert [s["valid"] for s in images] == [True, False] and images[1]["image"] is None
    assert [s["valid"] for s in plain] == [True, False] and "image" not in plain[0]
    assert caplog.text.count("1 of 2 generated fields are invalid") == 2


# --------------------------------------------------------------------------------------------- bad input
def test_bad_options_raise_clear_errors(lm_folder, shape_folder, tokenizer):
    pipe = pipeline(TASK, model=str(lm_folder))
    with pytest.raises(ValueError, match=r"unknown output_type 'png'; choose one of \('pil', 'weights', 'mesh'"):
        pipe(output_type="png")
    with pytest.raises(ValueError, match="output_type='mesh' renders 3D occupancy fields, but this model generates 2D"):
        pipe(output_type="mesh")
    with pytest.raises(ValueError, match="unconditional.*pass label=None"):
        pipe(num_samples=2, label=0)
    with pytest.raises(ValueError, match="takes no inputs"):
        pipe(4)
    with pytest.raises(TypeError, match=r"unknown options \['num_sample'\]"):
        pipe(num_sample=4)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        pipe(num_samples=0)
    shapes = pipeline(TASK, model=str(shape_folder))
    with pytest.raises(ValueError, match="output_type='pil' renders image fields, but this model generates 3D"):
        shapes(output_type="pil")
    no_source = pipeline(TASK, model=lm_for(tokenizer, field_source=None), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="output_type='pil' needs model.config.field_source"):
        no_source(num_samples=1)
    assert len(no_source(num_samples=1, output_type="weights")) == 1


def test_folders_without_tokenizer_or_with_the_wrong_head_are_refused(lm_folder, regression_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(lm_folder / name, bare / name)
    for load in (lambda: load_generation_folder(bare), lambda: pipeline(TASK, model=str(bare))):
        with pytest.raises(FileNotFoundError, match=f"{bare} holds no tokenizer: expected a NefVQTokenizer"):
            load()

    # a regression checkpoint whose config.json claims the causal LM head: refused, never loaded without its head
    mislabelled = tmp_path / "mislabelled"
    shutil.copytree(regression_folder, mislabelled)
    config = json.loads((mislabelled / "config.json").read_text())
    (mislabelled / "config.json").write_text(json.dumps({**config, "architectures": ["NefGPTForCausalLM"]}))
    with pytest.raises(OSError, match="weights that NefGPTForCausalLM does not use"):
        load_generation_folder(mislabelled)
    with pytest.raises(ValueError, match="weights that NefGPTForCausalLM does not use"):
        pipeline(TASK, model=str(mislabelled))
    (mislabelled / "config.json").write_text(json.dumps({**config, "architectures": None}))
    with pytest.raises(ValueError, match=r"needs exactly one of \['NefGPTForCausalLM', 'NefGPTForWeightRegression'\]"):
        load_generation_folder(mislabelled)
