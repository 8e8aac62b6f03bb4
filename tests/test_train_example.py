"""examples/train.py: in-process runs (resume = uninterrupted, errors, regression head, push_to_hub with patched
hub calls) and one real 2-process CPU run under `accelerate launch` that stops and resumes."""

import importlib.util
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as conftest.py: no hub calls (the subprocesses inherit it)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train.py"
NUM_CODES, LENGTH = 13, 10
TINY = ["--hidden_size", "32", "--num_hidden_layers", "2", "--per_device_train_batch_size", "8",
        "--lr_warmup_steps", "1", "--logging_steps", "1", "--eval_steps", "2", "--report_to", "none"]


def load_train_module():
    spec = importlib.util.spec_from_file_location("nef_train_example", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_train_module()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator: reset accelerate's process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A word-level tokenizer (3 specials + 13 codes) and tiny datasets of random ids and chunks, until the
    real NefVQTokenizer's folders are used here."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("train_data")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"<c{i}>": i + 3 for i in range(NUM_CODES)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(root / "tokenizer")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 3 + NUM_CODES, (40, LENGTH), generator=generator)
    ids[:, 0], ids[:, -1] = 1, 2
    labels = (torch.arange(40) % 3).tolist()
    Dataset.from_dict({"input_ids": ids.tolist(), "label": labels}).save_to_disk(root / "ids")
    bad = ids.clone()
    bad[3, 4] = 3 + NUM_CODES + 5
    Dataset.from_dict({"input_ids": bad.tolist()}).save_to_disk(root / "ids_other_vocab")
    # naive strategy: a real NeuronChunker of a 2->4->1 SIREN (4 chunks of 3 values, 1 of 5, padded to 5)
    from nef_transformers.fields.spec import SirenSpec
    from nef_transformers.tokenization import NeuronChunker

    spec = SirenSpec(hidden_dim=4, num_layers=2)
    chunker = NeuronChunker(spec, torch.zeros(spec.num_params))
    chunker.save_pretrained(root / "chunker")
    chunks = chunker.to_chunks(torch.randn(40, spec.num_params, generator=generator))
    Dataset.from_dict({"chunks": chunks.tolist(), "label": labels}).save_to_disk(root / "chunks")
    return root


def ids_args(data, output_dir, *extra):
    return ["--dataset", str(data / "ids"), "--tokenizer", str(data / "tokenizer"), "--output_dir", str(output_dir),
            *TINY, *extra]


def test_interrupted_run_resumes_without_lost_steps(train, data, tmp_path):
    common = ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2"]
    straight = train.main(ids_args(data, tmp_path / "straight", *common))
    assert straight["finished"] and straight["completed_steps"] == 6 and straight["world_size"] == 1
    # 36 train rows / 8 = 5 batches = 3 steps per epoch: stopping at 4 resumes in the middle of epoch 1
    stopped = train.main(ids_args(data, tmp_path / "resumed", *common, "--stop_after_steps", "4"))
    assert not stopped["finished"] and stopped["completed_steps"] == 4
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train.main(ids_args(data, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    assert resumed["finished"] and resumed["resumed_from"].endswith("step_4")
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    assert resumed["eval_loss"] == straight["eval_loss"]

    with pytest.raises(ValueError, match=r"cannot resume .*hidden_size: checkpoint 32, now 64"):
        train.main(ids_args(data, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
                   + ["--hidden_size", "64"])


def test_checkpoint_from_before_chunk_noise_and_mixup_resumes(train, data, tmp_path):
    # checkpoints written before --chunk_noise / --mixup_* existed have no such keys in their signature: trained
    # without noise and without mixup
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    train.main(ids_args(data, tmp_path, *common, "--stop_after_steps", "2"))
    (state_file,) = (tmp_path / "checkpoints").glob("step_2/nef_training_state.json")
    state = json.loads(state_file.read_text())
    assert state["signature"].pop("chunk_noise") == 0.0
    assert (state["signature"].pop("mixup_neighbours"), state["signature"].pop("mixup_max")) == (0, 0.5)
    state_file.write_text(json.dumps(state))
    resumed = train.main(ids_args(data, tmp_path, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["finished"] and resumed["resumed_from"].endswith("step_2")


def test_output_folder_reloads_through_auto_classes(train, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train.main(ids_args(data, tmp_path, "--max_train_steps", "3", "--class_conditional"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model.config.check_tokenizer(tokenizer)
    assert model.config.num_classes == 3 and summary["head"] == "causal_lm"
    samples = model.generate(class_labels=torch.tensor([0, 2]), seed=0)
    assert samples.shape == (2, LENGTH)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert any("eval_loss" in record for record in state["log_history"])


STEPS, LR = 40, 0.01  # seeded: the validation loss bottoms out before the last step (32 of 40 here)


def test_keep_best_model_keeps_the_lowest_validation_loss(train, data, tmp_path):
    # random codes and a large learning rate: the validation loss stops falling before the end
    summary = train.main(ids_args(data, tmp_path, "--max_train_steps", str(STEPS), "--learning_rate", str(LR),
                                  "--keep_best_model"))
    evals = [(record["step"], record["eval_loss"]) for record in summary["log_history"] if "eval_loss" in record]
    assert [step for step, _ in evals] == list(range(2, STEPS + 1, 2))
    best_step, best_loss = min(evals, key=lambda item: item[1])
    assert summary["best_step"] == best_step and summary["eval_loss"] == best_loss
    assert summary["final_eval_loss"] == evals[-1][1]
    final, best = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "best" / "model.safetensors")
    assert best.keys() <= final.keys() and all(torch.equal(final[k], best[k]) for k in best)
    assert best_step < STEPS  # so the final folder is not the last step's model
    last = load_file(next((tmp_path / "checkpoints" / f"step_{STEPS}").glob("model*.safetensors")))
    assert any(not torch.equal(last[k], final[k]) for k in best if k in last)
    with pytest.raises(ValueError, match="--keep_best_model needs a validation split"):
        train.main(ids_args(data, tmp_path / "no_val", "--max_train_steps", "2", "--keep_best_model",
                            "--validation_split", "0"))


def test_regression_head_trains_on_chunks(train, data, tmp_path):
    from nef_transformers.models.nef_gpt import NefGPTForWeightRegression
    from nef_transformers.tokenization import NeuronChunker

    summary = train.main(["--dataset", str(data / "chunks"), "--tokenizer", str(data / "chunker"),
                          "--output_dir", str(tmp_path), *TINY, "--max_train_steps", "3", "--mixed_precision", "bf16"])
    assert summary["head"] == "regression" and summary["eval_loss"] is not None
    model = NefGPTForWeightRegression.from_pretrained(tmp_path)
    assert model.config.token_chunk_widths == [3, 3, 3, 3, 5] and model.config.token_layer_ids == [1, 1, 1, 1, 2]
    chunker = NeuronChunker.from_pretrained(tmp_path / "tokenizer")
    samples = model.sample(2, seed=0)
    assert samples.shape == (2, 5, 5) and (samples[:, :4, 3:] == 0).all(), "padding stays zero"
    assert chunker.from_chunks(samples).shape == (2, chunker.spec.num_params)


@pytest.fixture
def seen(monkeypatch):
    """(training?, labels) of every NefGPTForWeightRegression forward call: what the model was really shown."""
    from nef_transformers.models.nef_gpt import NefGPTForWeightRegression

    calls = []
    original = NefGPTForWeightRegression.forward

    def recording(self, *args, **kwargs):
        calls.append((self.training, kwargs["labels"].detach().clone()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NefGPTForWeightRegression, "forward", recording)
    return calls


def test_chunk_noise_perturbs_the_training_chunks_only(train, data, tmp_path, seen):
    from datasets import load_from_disk

    summary = train.main(["--dataset", str(data / "chunks"), "--tokenizer", str(data / "chunker"),
                          "--output_dir", str(tmp_path), *TINY, "--max_train_steps", "20", "--chunk_noise", "0.5"])
    assert summary["chunk_noise"] == 0.5
    rows = torch.tensor(load_from_disk(str(data / "chunks"))["chunks"]).float()  # (40, 5, 5)
    padding = rows.abs().sum(0) == 0
    flat = rows.flatten(1)

    def nearest(labels):
        return flat[torch.cdist(labels.flatten(1), flat).argmin(1)].view_as(labels)

    evaluated = torch.cat([labels for training, labels in seen if not training])
    assert len(evaluated) and torch.equal(nearest(evaluated), evaluated)  # validation: the chunks as they are
    trained = torch.cat([labels for training, labels in seen if training])
    assert len(trained) == 4 * 36 and (trained[:, padding] == 0).all()  # 20 steps = 4 epochs of 36; padding stays 0
    residual = (trained - nearest(trained))[:, ~padding]
    ratio = float(residual.std() / rows[:, ~padding].std())
    assert 0.4 < ratio < 0.6, ratio  # noise of 0.5 x the chunks' std
    with pytest.raises(ValueError, match="--chunk_noise is for continuous chunks"):
        train.main(ids_args(data, tmp_path / "ids", "--max_train_steps", "1", "--chunk_noise", "0.5"))
    with pytest.raises(SystemExit):
        train.main(ids_args(data, tmp_path / "ids", "--chunk_noise", "-1"))


def test_nearest_neighbours_match_brute_force_in_blocks_and_within_classes():
    import numpy as np

    from nef_transformers.training import nearest_neighbours

    values = torch.randn(23, 3, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(23) % 2
    flat = values.flatten(1).numpy()
    dist = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert torch.equal(nearest_neighbours(values, None, 4, block=5), torch.from_numpy(dist.argsort(1)[:, :4]))
    dist[labels.numpy()[:, None] != labels.numpy()[None]] = np.inf
    found = nearest_neighbours(values, labels, 3, block=7)
    assert torch.equal(found, torch.from_numpy(dist.argsort(1)[:, :3]))
    assert (labels[found] == labels[:, None]).all()
    with pytest.raises(ValueError, match="class 1 has only 11 training sequences; every class needs more than 11"):
        nearest_neighbours(values, labels, 11)
    with pytest.raises(ValueError, match="needs more than 23 training sequences, got 23"):
        nearest_neighbours(values, None, 23)


def test_mixup_moves_each_training_sequence_towards_one_of_its_neighbours(train, data, tmp_path, seen):
    from datasets import load_from_disk

    from nef_transformers.training import nearest_neighbours

    summary = train.main(["--dataset", str(data / "chunks"), "--tokenizer", str(data / "chunker"),
                          "--output_dir", str(tmp_path), *TINY, "--max_train_steps", "10",
                          "--mixup_neighbours", "2", "--mixup_max", "0.4", "--validation_split", "0.1"])
    assert (summary["mixup_neighbours"], summary["mixup_max"]) == (2, 0.4)
    rows = torch.tensor(load_from_disk(str(data / "chunks"))["chunks"]).float().flatten(1)  # (40, 25)
    evaluated = torch.cat([labels for training, labels in seen if not training]).flatten(1)
    validation = torch.cdist(evaluated, rows).min(1).values
    assert len(evaluated) and (validation < 1e-5).all()  # validation: the chunks as they are
    train_rows = rows[torch.cdist(rows, evaluated).min(1).values > 1e-5]  # the 36 the model trained on
    neighbours = nearest_neighbours(train_rows, None, 2)
    shares = []
    for mixed in torch.cat([labels for training, labels in seen if training]).flatten(1):
        # the share s and the residual of mixed = row + s (neighbour - row), for every row and its 2 neighbours
        direction = train_rows[neighbours] - train_rows[:, None]  # (36, 2, 25)
        share = ((mixed - train_rows)[:, None] * direction).sum(-1) / direction.pow(2).sum(-1)
        residual = (train_rows[:, None] + share[..., None] * direction - mixed).norm(dim=-1)
        on_segment = residual.flatten() < 1e-4
        assert on_segment.any()
        shares.append(share.flatten()[on_segment].min())  # a mutual pair reads s from one end, 1 - s from the other
    shares = torch.stack(shares)
    assert len(shares) == 2 * 36 and shares.min() >= 0 and shares.max() <= 0.4 and shares.max() > 0.2
    with pytest.raises(ValueError, match="--mixup_neighbours is for continuous chunks"):
        train.main(ids_args(data, tmp_path / "ids", "--max_train_steps", "1", "--mixup_neighbours", "2"))


def test_bad_datasets_raise_clear_errors(train, data, tmp_path):
    with pytest.raises(ValueError, match=r"train split: input_ids hold ids in \[1, 21\] but the model's vocabulary is \[0, 16\)"):
        train.main(["--dataset", str(data / "ids_other_vocab"), "--tokenizer", str(data / "tokenizer"),
                    "--output_dir", str(tmp_path), *TINY])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(["--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path), *TINY])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.main(ids_args(data, tmp_path / "fresh", "--resume_from_checkpoint", "latest"))


def test_push_to_hub_pushes_the_final_folder(train, data, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "create_commit") as create_commit, \
            mock.patch.object(ModelCard, "load", side_effect=AssertionError("no hub README download")):
        summary = train.main(ids_args(data, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                      "--push_to_hub", "someone/nef-gpt-test"))
    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "someone/nef-gpt-test"
    create_commit.assert_called_once()
    operations = create_commit.call_args.kwargs["operations"]
    pushed = {op.path_in_repo for op in operations}
    assert pushed == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json", "README.md", "trainer_state.json"}
    assert pushed == set(summary["pushed_files"])
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "someone/nef-gpt-test" in card


def test_push_with_card_metrics_of_another_run_shows_them_outside_the_model_index(train, data, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"rows": [
        {"strategy": "oracle-train", "mmd": 0.04, "cov": 0.5, "one_nna": 0.5, "fd": 2.0, "num_samples": 8,
         "invalid": 0},
        {"strategy": "nef_gpt-vq", "top_k": 5, "temperature": 1.0, "mmd": 0.05, "cov": 0.375, "one_nna": 0.8125,
         "fd": None, "num_samples": 8, "invalid": 1},
    ]}))
    template = REPO / "hub_cards" / "mnist-vq.md"
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "create_commit") as create_commit, \
            mock.patch.object(ModelCard, "load", side_effect=AssertionError("no hub README download")):
        train.main(ids_args(data, tmp_path / "model", "--max_train_steps", "2", "--push_to_hub", "nefgen/mnist-vq",
                            "--model_card_template", str(template), "--card_metrics", str(metrics)))
    readme = next(op for op in create_commit.call_args.kwargs["operations"] if op.path_in_repo == "README.md")
    card = Path(readme.path_or_fileobj).read_text(encoding="utf-8")
    # the file names no model folder: its numbers are shown, labelled, but never claimed in the model-index
    assert ModelCard(card).data.eval_results is None and "model-index" not in card
    assert "| nef_gpt-vq (top-k 5, temperature 1) | 1/8 |" in card and "| oracle-train" in card
    assert "Not tied to this checkpoint" in card
    assert f"--card_metrics {metrics}" in card, "the card records the command that trained the checkpoint"


def test_bad_card_metrics_fail_before_training(train, data, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"table": []}))
    with pytest.raises(ValueError, match=f"--card_metrics {metrics} has no key 'rows'"):
        train.main(ids_args(data, tmp_path / "model", "--card_metrics", str(metrics)))
    assert not (tmp_path / "model").exists(), "refused before any training"


def test_two_cpu_processes_train_and_resume(data, tmp_path, accelerate_launch):
    """HF_NOTES trap 3: --multi_gpu + Accelerator(cpu=True) gives one gloo run of world size 2."""
    args = [str(TRAIN_SCRIPT), "--cpu", *ids_args(data, tmp_path, "--max_train_steps", "4", "--checkpointing_steps",
                                                   "2", "--per_device_train_batch_size", "4")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = accelerate_launch(args + ["--stop_after_steps", "2"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_2").is_dir() and not (tmp_path / "model.safetensors").exists()
    second = accelerate_launch(args + ["--resume_from_checkpoint", "latest"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["world_size"] == 2, "two launched processes must form one run of world size 2"
    assert state["completed_steps"] == 4 and state["resumed_from"].endswith("step_2")
    assert (tmp_path / "model.safetensors").is_file()
