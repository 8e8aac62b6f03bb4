"""Hub cards: model card templates with and without measured metrics (`--card_metrics`), the validation of metrics
files, and the dataset card of weight datasets (`nef_transformers.data.card`, written by `fit_to_disk`)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard

from nef_transformers.data.card import dataset_card, size_category
from nef_transformers.data.metadata import make_weight_dataset
from nef_transformers.fields import FitConfig, SirenSpec
from nef_transformers.training import (
    BASE_CARD_TAGS, build_parser, load_card_metrics, model_card_context, render_model_card,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_TEMPLATES = ["nef_gpt_model_card.md", "mnist-vq.md", "shapenet-vq.md"]
GENERATOR = {"strategy": "nef_gpt-vq", "top_k": 5, "temperature": 1.0, "mmd": 0.05123, "cov": 0.412,
             "one_nna": 0.8345, "fd": 12.25, "memorisation_ratio": 0.95, "recognised": 0.7, "num_samples": 40,
             "invalid": 2}
ORACLE = {"strategy": "oracle-train", "top_k": None, "temperature": None, "mmd": 0.0441, "cov": 0.56,
          "one_nna": 0.48, "fd": 1.5, "memorisation_ratio": 1.0, "recognised": 0.9, "num_samples": 40, "invalid": 0}
GAUSSIAN = {**ORACLE, "strategy": "gaussian", "mmd": 0.09, "cov": 0.03, "one_nna": 0.99, "fd": 80.0}
METRIC_TYPES = {"mmd": "mmd", "cov": "cov", "one_nna": "1-nna", "fd": "frechet-distance"}
# a number that reads as a metric value: a decimal or a percentage
METRIC_VALUE = re.compile(r"\d+\.\d+|\d+\s*%")


def tiny_model(kind: str = "image"):
    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForCausalLM

    spec = SirenSpec(hidden_dim=4) if kind == "image" else SirenSpec(in_dim=3, hidden_dim=4, omega_0=20.0)
    source = ({"kind": "image", "name": "mnist", "image_shape": [28, 28, 1], "mean": [0.1307], "std": [0.3081]}
              if kind == "image" else {"kind": "occupancy", "name": "shapes", "class_names": ["airplane", "chair"]})
    config = NefGPTConfig(vocab_size=16, max_position_embeddings=10, hidden_size=16, num_attention_heads=2,
                          num_hidden_layers=1, field_spec=spec.to_dict(), field_source=source,
                          num_classes=0 if kind == "image" else 2)
    return NefGPTForCausalLM(config)


def render(template: str, folder: Path, metrics_file: Path | None = None, model=None) -> ModelCard:
    """A card as `main` renders it at the end of a (pretend) training run into ``folder``."""
    argv = ["--dataset", "runs/x/tokens/dataset", "--output_dir", str(folder), "--push_to_hub", "nefgen/test-vq",
            "--model_card_template", str(REPO / "hub_cards" / template)]
    if metrics_file is not None:
        argv += ["--card_metrics", str(metrics_file)]
    args = build_parser().parse_args(argv)
    model = model if model is not None else tiny_model("occupancy" if "shapenet" in template else "image")
    head = "causal_lm" if type(model).__name__ == "NefGPTForCausalLM" else "regression"
    summary = {"head": head, "num_parameters": model.num_parameters(), "completed_steps": 3, "world_size": 1,
               "eval_loss": 2.5}
    context = model_card_context(args, argv, model, summary, num_train=36, num_validation=4)
    metrics = load_card_metrics(metrics_file) if metrics_file is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    card = render_model_card(args.model_card_template, folder, context, metrics)
    assert (folder / "README.md").read_text(encoding="utf-8") == card.content
    return card


def write_metrics(path: Path, rows=None, **extra) -> Path:
    path.write_text(json.dumps({"rows": [GENERATOR, ORACLE, GAUSSIAN] if rows is None else rows, **extra}),
                    encoding="utf-8")
    return path


def same_checkpoint_metrics(tmp_path: Path, rows=None) -> Path:
    """A metrics file naming a model folder whose weights file equals the one the card is rendered for."""
    evaluated, model = tmp_path / "evaluated", tmp_path / "model"
    for folder in (evaluated, model):
        folder.mkdir(exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"same weights")
    return write_metrics(tmp_path / "metrics.json", rows, model=str(evaluated))


def flat(text: str) -> str:
    """The text on one line: shell continuations and runs of whitespace become one space."""
    return " ".join(text.replace("\\\n", " ").split())


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


# ---------------------------------------------------------------------------------------------- model cards
@pytest.mark.parametrize("template", MODEL_TEMPLATES)
def test_card_without_metrics_has_no_metric_values(template, tmp_path):
    card = render(template, tmp_path)
    data = ModelCard(card.content).data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert set(BASE_CARD_TAGS) <= set(data.tags)
    assert data.eval_results is None and "model-index" not in card.content
    results = section(card.content, "Evaluation results")
    assert "Not measured for this checkpoint" in results
    assert not METRIC_VALUE.findall(results), results
    assert "{{" not in card.content and "{%" not in card.content


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_regression_card_names_the_mixture_head(covariance, tmp_path):
    from nef_transformers.models.nef_gpt import NefGPTConfig, NefGPTForWeightRegression

    config = NefGPTConfig(max_position_embeddings=8, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                          chunk_dim=4, num_mixtures=3, mixture_covariance=covariance,
                          field_spec=SirenSpec(hidden_dim=4).to_dict(), field_source=tiny_model().config.field_source)
    card = render("nef_gpt_model_card.md", tmp_path, model=NefGPTForWeightRegression(config))
    assert f"| chunk width | 4 (3 Gaussian-mixture components per chunk, {covariance} covariances) |" in card.content
    assert "| vocabulary |" not in card.content and "{{" not in card.content


@pytest.mark.parametrize("template", MODEL_TEMPLATES)
def test_card_with_metrics_reports_the_files_numbers(template, tmp_path):
    untied = render(template, tmp_path / "untied", write_metrics(tmp_path / "untied.json"))
    assert ModelCard(untied.content).data.eval_results is None, "numbers not tied to these weights stay out of the YAML"
    assert "Not tied to this checkpoint" in section(untied.content, "Evaluation results")
    card = render(template, tmp_path / "model", same_checkpoint_metrics(tmp_path))
    data = ModelCard(card.content).data
    reported = {result.metric_type: result.metric_value for result in data.eval_results}
    assert reported == {METRIC_TYPES[key]: GENERATOR[key] for key in METRIC_TYPES}, "the generator row, exactly"
    assert {result.metric_args["top_k"] for result in data.eval_results} == {5}
    assert data.model_name == "nefgen/test-vq"
    results = section(card.content, "Evaluation results")
    assert "| nef_gpt-vq (top-k 5, temperature 1) | 2/40 | 0.05123 | 41.2% | 83.5% | 12.2 | 0.95 |" in results
    assert "| oracle-train" in results and "gaussian" not in results, "oracle beside it, other baselines not"
    assert "Measured on this checkpoint" in results


def test_card_reports_the_generator_after_the_benchmarks_baseline_rows(tmp_path):
    # generation_quality.py writes the baselines first, then (learned strategy) the autoencoder's ceiling and the
    # Gaussian over its latents and the jittered copies: none of them is the generator
    ceiling = {**ORACLE, "strategy": "autoencoder-train", "mmd": 0.047, "one_nna": 0.58}
    latent_gaussian = {**ORACLE, "strategy": "gaussian-latent", "mmd": 0.06, "one_nna": 0.74}
    jittered = {**ORACLE, "strategy": "noisy-latent", "mmd": 0.05, "one_nna": 0.66}
    rows = [ORACLE, GAUSSIAN, ceiling, latent_gaussian, jittered, GENERATOR]
    card = render("mnist-vq.md", tmp_path / "model", same_checkpoint_metrics(tmp_path, rows))
    reported = {result.metric_type: result.metric_value for result in ModelCard(card.content).data.eval_results}
    assert reported == {METRIC_TYPES[key]: GENERATOR[key] for key in METRIC_TYPES}


def test_card_reports_the_code_strategys_generator_not_its_ceiling_or_priors(tmp_path):
    # the code strategy's rows: its VAE's ceiling, N(0, I) codes and the mixture over the codes come before NefGPT's
    rows = [ORACLE, {**ORACLE, "strategy": "autoencoder-train", "one_nna": 0.58},
            {**ORACLE, "strategy": "code-train", "one_nna": 0.61},
            {**ORACLE, "strategy": "gaussian-code", "one_nna": 0.79},
            {**ORACLE, "strategy": "mixture-code", "one_nna": 0.70, "seed": 0}, {**GENERATOR, "strategy": "code"}]
    metrics = load_card_metrics(write_metrics(tmp_path / "metrics.json", rows))
    assert metrics["generator"] == rows[-1] and metrics["oracle"] == ORACLE


def test_card_reports_the_mean_over_draws_when_the_file_has_one(tmp_path):
    from nef_transformers.experiment import seed_means

    draws = [{**GENERATOR, "seed": 0, "one_nna": 0.70, "one_nna_references": 0.8},
             {**GENERATOR, "seed": 1, "one_nna": 0.66, "one_nna_references": 0.8},
             {**GENERATOR, "temperature": 1.3, "seed": 0, "one_nna_references": 0.8},
             {**GENERATOR, "temperature": 1.3, "seed": 1, "one_nna_references": 0.8}]
    rows = [ORACLE, *draws, *seed_means(draws)]
    card = render("mnist-vq.md", tmp_path / "model", same_checkpoint_metrics(tmp_path, rows))
    index = {result.metric_type: result for result in ModelCard(card.content).data.eval_results}
    assert index["1-nna"].metric_value == pytest.approx(0.68), "the mean of the first setting's draws, not a draw"
    assert index["1-nna"].metric_args == {"top_k": 5, "temperature": 1.0, "num_samples": 80, "draws": 2}
    results = section(card.content, "Evaluation results")
    assert "| nef_gpt-vq (top-k 5, temperature 1, mean of 2 draws) | 4/80 |" in results
    assert "| 68.0% ± 2.0% |" in results  # the draws 0.70 and 0.66: sd 0.028, standard error 0.02
    assert "80 sampled fields in 2 draws (the metrics are the draws' means" in flat(results)
    # without the mean rows: the first draw, labelled as one
    single = load_card_metrics(write_metrics(tmp_path / "draws.json", [ORACLE, *draws]))
    assert single["generator"] == draws[0]


def test_metrics_that_were_not_measured_stay_out_of_the_model_index(tmp_path):
    rows = [{**GENERATOR, "fd": None, "memorisation_ratio": None}]
    card = render("mnist-vq.md", tmp_path / "model", same_checkpoint_metrics(tmp_path, rows))
    types = {result.metric_type for result in ModelCard(card.content).data.eval_results}
    assert types == {"mmd", "cov", "1-nna"}
    results = section(card.content, "Evaluation results")
    assert "| 12.2" not in results and "| – | – |" in results and "oracle" not in results


def test_card_says_whether_the_metrics_are_of_this_checkpoint(tmp_path):
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    (evaluated / "model.safetensors").write_bytes(b"same weights")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"same weights")
    metrics = write_metrics(tmp_path / "metrics.json", model=str(evaluated))
    assert "Measured on this checkpoint" in section(render("mnist-vq.md", model, metrics).content, "Evaluation results")
    (evaluated / "model.safetensors").write_bytes(b"other weights")
    text = section(render("mnist-vq.md", model, metrics).content, "Evaluation results")
    assert "Measured on another checkpoint" in text and str(evaluated) in text


def test_shapenet_card_gives_hyperdiffusion_numbers_only_as_theirs(tmp_path):
    text = render("shapenet-vq.md", tmp_path).content
    theirs = section(text, "Reference numbers from other work (not this model)")
    assert "| HyperDiffusion | 49 % | 69.3 % | 3.5 |" in theirs and "as its authors report them" in theirs
    assert "69.3" not in text.replace(theirs, ""), "their numbers appear in their section only"
    for synset in ("02691156", "03001627"):
        assert f'"$SHAPENET/{synset}"' in text
    assert "--push_to_hub nefgen/shapenet-vq --model_card_template hub_cards/shapenet-vq.md" in flat(text)
    assert ModelCard(text).data.datasets == ["ShapeNet/ShapeNetCore"]


def test_mnist_card_has_the_commands_that_train_it(tmp_path):
    text = flat(render("mnist-vq.md", tmp_path).content)
    for command in ("nef-transformers fit --source mnist --out runs/mnist-vq/fields",
                    "nef-transformers tokenize --nefs runs/mnist-vq/fields --strategy vq",
                    "--push_to_hub nefgen/mnist-vq --model_card_template hub_cards/mnist-vq.md --card_metrics",
                    'pipeline("neural-field-generation", model="nefgen/test-vq")',
                    "tokenizer.decode_weights(ids)"):
        assert command in text
    assert ModelCard(render("mnist-vq.md", tmp_path).content).data.pipeline_tag == "unconditional-image-generation"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not a JSON file"),
    ({"results": []}, "has no key 'rows'"),
    ({"rows": []}, "'rows' must be a non-empty list"),
    ({"rows": [{"mmd": 0.1}]}, r"rows\[0\] has no key 'strategy'"),
    ({"rows": [ORACLE, {k: v for k, v in GENERATOR.items() if k != "one_nna"}]},
     r"rows\[1\] \(strategy 'nef_gpt-vq'\) has no key 'one_nna'"),
    ({"rows": [{k: v for k, v in ORACLE.items() if k != "cov"}, GENERATOR]}, r"rows\[0\] .*has no key 'cov'"),
    ({"rows": [ORACLE, GAUSSIAN]}, "every row is an oracle or baseline"),
    ({"rows": [{**GENERATOR, "mmd": "0.05"}]}, "'mmd' is '0.05'; expected a finite number"),
    ({"rows": [{**GENERATOR, "invalid": -1}]}, "'invalid' is -1; expected an integer >= 0"),
])
def test_bad_metrics_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    error = FileNotFoundError if content is None else ValueError
    with pytest.raises(error, match=f"--card_metrics {re.escape(str(path))}.*{message}"):
        load_card_metrics(path)


def test_non_finite_metric_values_are_refused(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"rows": [{**GENERATOR, "fd": float("nan")}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="'fd' is nan; expected a finite number"):
        load_card_metrics(path)


def test_a_template_holding_metric_values_is_refused(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\nlicense: apache-2.0\nmodel-index:\n- name: x\n---\n# {{ model_name }}\n",
                        encoding="utf-8")
    with pytest.raises(ValueError, match="holds \\['model-index'\\]"):
        render_model_card(template, tmp_path, {"model_name": "x"})


# --------------------------------------------------------------------------------------------- dataset card
def weight_dataset(kind: str, num_fields: int = 12, quality: bool = True):
    spec = SirenSpec(hidden_dim=4) if kind == "image" else SirenSpec(in_dim=3, hidden_dim=4)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(num_fields, spec.num_params, generator=generator)
    column = "psnr" if kind == "image" else "iou"
    scale, offset = (20.0, 20.0) if kind == "image" else (1.0, 0.0)  # PSNR in dB, IoU in [0, 1]
    values = torch.rand(num_fields, generator=generator) * scale + offset
    source = ({"kind": "image", "name": "digits", "image_shape": [8, 8, 1], "mean": [0.5], "std": [0.25],
               "class_names": ["zero", "one"]} if kind == "image" else
              {"kind": "occupancy", "name": "chairs", "class_names": ["chair"], "resolution": 32})
    fit = {**FitConfig(steps=7).to_dict(), "loss_curve": [0.5, 0.25, 0.125]} if quality else None
    return make_weight_dataset(weights, [i % 2 if kind == "image" else 0 for i in range(num_fields)], spec,
                               weights[0] if quality else None, source,
                               quality={column: values} if quality else None, fit=fit)


@pytest.mark.parametrize("kind", ["image", "occupancy"])
def test_dataset_card_numbers_come_from_the_dataset(kind):
    dataset = weight_dataset(kind)
    card = dataset_card(dataset, location="runs/x")
    data = DatasetCard(card.content).data
    assert data.license == "other" and data.size_categories == "n<1K"
    assert {"nef_transformers", "neural-fields", "weight-space", "siren"} <= set(data.tags)
    assert (data.task_categories == ["unconditional-image-generation"]) == (kind == "image")
    column = "psnr" if kind == "image" else "iou"
    values = np.asarray(dataset[column], dtype=np.float64)
    quality = section(card.content, "Quality")
    row = re.search(r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", quality)
    assert [float(v) for v in row.groups()] == pytest.approx(
        [values.mean(), np.median(values), values.min(), values.max()], abs=5e-4)
    assert f"{dataset.features['weights'].length} float32 weights per field" in flat(card.content)
    assert "Mean loss over the fields at the last step: 0.125" in card.content
    assert 'load_nef_dataset("runs/x")' in card.content and 'load_from_disk("runs/x/dataset")' in card.content
    if kind == "image":
        assert "| 0 | zero | 6 |" in card.content and "points_per_step" not in card.content
    else:
        assert "points_per_step" in card.content and "`resolution`: 32" in card.content


def test_dataset_card_of_imported_weights_says_quality_was_not_measured():
    card = dataset_card(weight_dataset("image", quality=False))
    quality = section(card.content, "Quality")
    assert "Not measured" in quality and not METRIC_VALUE.findall(quality)
    assert "No fit settings recorded" in card.content


def test_size_categories_follow_the_hub_buckets():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10_000, 250_000, 5 * 10**6)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_fit_to_disk_writes_the_dataset_card(tmp_path):
    from nef_transformers.data.images import ImageSource, load_mnist
    from nef_transformers.data.weights import fit_to_disk

    mnist = load_mnist()
    keep = np.r_[0:3, 500:503]
    digits = ImageSource(mnist.images[keep], mnist.labels[keep], name="mnist-6", mean=mnist.mean, std=mnist.std)
    dataset = fit_to_disk(digits, tmp_path / "fit", SirenSpec(hidden_dim=4), FitConfig(steps=3, batch_size=4),
                          shard_size=4, progress=False)
    card = DatasetCard.load(tmp_path / "fit" / "README.md")
    assert card.data.pretty_name == "SIREN weights of mnist-6" and card.data.size_categories == "n<1K"
    mean = re.search(r"\| ([\d.]+) \|", section(card.content, "Quality")).group(1)
    assert float(mean) == pytest.approx(np.mean(dataset["psnr"]), abs=5e-4)
    assert f'load_nef_dataset("{tmp_path / "fit"}")' in card.content
