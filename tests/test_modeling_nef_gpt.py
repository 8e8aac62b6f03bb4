"""NefGPT: invariants first (cache = no cache, save = load, Auto* round trip), then tiny seeded training runs,
then the errors users get for bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as conftest.py: no hub calls; set before transformers is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, StaticCache  # noqa: E402

from nef_transformers.models.nef_gpt import (  # noqa: E402
    NefGPTConfig,
    NefGPTForCausalLM,
    NefGPTForWeightRegression,
    NefGPTModel,
    register,
)

VOCAB, LENGTH, BOS, EOS, PAD = 20, 12, 1, 2, 0
STRUCTURE = dict(
    token_layer_ids=[0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0],
    token_neuron_ids=[0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 0],
    token_level_ids=[0, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 0],
)


def tiny_config(**overrides) -> NefGPTConfig:
    kwargs = dict(vocab_size=VOCAB, max_position_embeddings=LENGTH, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, **STRUCTURE)
    kwargs.update(overrides)
    return NefGPTConfig(**kwargs)


def random_sequences(n: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = BOS, EOS
    return ids


@pytest.fixture
def lm() -> NefGPTForCausalLM:
    torch.manual_seed(0)
    return NefGPTForCausalLM(tiny_config(num_classes=3)).eval()


def regression_config(**overrides) -> NefGPTConfig:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, chunk_dim=5,
                  num_mixtures=3, max_position_embeddings=8, token_layer_ids=[1, 1, 1, 2, 2, 2, 3, 3],
                  token_neuron_ids=[1, 2, 3, 1, 2, 3, 1, 2], token_chunk_widths=[3, 3, 3, 5, 5, 5, 4, 4])
    kwargs.update(overrides)
    return NefGPTConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_config_validates_and_round_trips(tmp_path):
    config = tiny_config(num_classes=3)
    assert config.sequence_length == LENGTH and config.intermediate_size == 128
    config.save_pretrained(tmp_path)
    assert NefGPTConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="one length"):
        tiny_config(token_level_ids=[0] * 5)
    with pytest.raises(ValueError, match="raise max_position_embeddings"):
        tiny_config(max_position_embeddings=8)
    with pytest.raises(ValueError, match="mixture_covariance must be one of"):
        tiny_config(mixture_covariance="tied")


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("cache_class", [DynamicCache, StaticCache])
def test_cached_forward_equals_full_forward(lm, cache_class):
    ids = random_sequences(3)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        full = lm(ids, class_labels=labels).logits
        cache = (DynamicCache(config=lm.config) if cache_class is DynamicCache
                 else StaticCache(config=lm.config, max_cache_len=LENGTH))
        out = lm(ids[:, :5], cache=cache, use_cache=True, class_labels=labels)  # a multi-token prefill
        pieces = [out.logits]
        out = lm(ids[:, 5:7], cache=out.cache, use_cache=True, class_labels=labels)  # a multi-token step after it
        pieces.append(out.logits)
        for i in range(7, LENGTH):
            out = lm(ids[:, i : i + 1], cache=out.cache, use_cache=True, class_labels=labels)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_identical_with_and_without_cache(lm):
    bos = torch.full((4, 1), BOS)
    labels = torch.tensor([0, 1, 2, 0])
    static = lm.generate(bos, do_sample=False, class_labels=labels)
    dynamic = lm.generate(bos, do_sample=False, class_labels=labels, cache_implementation="dynamic")
    uncached = lm.generate(bos, do_sample=False, class_labels=labels, use_cache=False)
    assert static.shape == (4, LENGTH)
    assert torch.equal(static, dynamic) and torch.equal(static, uncached)


def test_sampling_defaults_seeds_and_fixed_layout(lm):
    assert (lm.generation_config.do_sample, lm.generation_config.top_k, lm.generation_config.temperature,
            lm.generation_config.max_length) == (True, 5, 0.8, LENGTH)
    first = lm.generate(num_return_sequences=6, seed=0)
    assert torch.equal(first, lm.generate(num_return_sequences=6, seed=0))
    assert not torch.equal(first, lm.generate(num_return_sequences=6, seed=1))
    nucleus = lm.generate(num_return_sequences=6, seed=0, top_k=None, top_p=0.9, temperature=1.3)
    for ids in (first, nucleus):
        assert ids.shape == (6, LENGTH)
        assert (ids[:, 0] == BOS).all() and (ids[:, -1] == EOS).all()
        assert (ids[:, 1:-1] >= 3).all(), "special tokens must not appear inside a field's sequence"


def test_generation_stays_inside_each_positions_id_range():
    # like a VQ tokenizer: two codebook levels with their own id ranges, alternating
    ranges = [[BOS, BOS + 1]] + [[3, 11] if i % 2 == 0 else [11, 20] for i in range(LENGTH - 2)] + [[EOS, EOS + 1]]
    torch.manual_seed(0)
    model = NefGPTForCausalLM(tiny_config(token_id_ranges=ranges)).eval()
    ids = model.generate(num_return_sequences=8, seed=0, top_k=None, temperature=2.0)
    for position, (start, end) in enumerate(ranges):
        assert ((ids[:, position] >= start) & (ids[:, position] < end)).all(), position
    with pytest.raises(ValueError, match=r"token_id_ranges\[1\] = \[3, 30\) is not a non-empty range"):
        tiny_config(token_id_ranges=[ranges[0], [3, 30]] + ranges[2:])


def test_save_load_and_auto_classes_without_remote_code(lm, tmp_path):
    register()
    ids = random_sequences(2)
    lm.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "nef_gpt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is NefGPTForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.config.token_level_ids == STRUCTURE["token_level_ids"]
    assert loaded.generation_config.top_k == 5 and loaded.generation_config.cache_implementation == "static"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, lm(ids).logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is NefGPTModel
        assert torch.equal(base(ids).last_hidden_state, lm.model(ids).last_hidden_state)


def test_right_padding_mask_leaves_real_positions_unchanged(lm):
    ids = random_sequences(2)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        plain, padded = lm(ids).logits, lm(ids, attention_mask=mask).logits
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[1, :8], plain[1, :8], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- training
def test_tiny_model_overfits_a_handful_of_sequences():
    torch.manual_seed(0)
    model = NefGPTForCausalLM(tiny_config(num_classes=4))
    ids, labels = random_sequences(4, seed=1), torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, labels=ids, class_labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05
    model.eval()
    generated = model.generate(class_labels=labels, do_sample=False)
    assert torch.equal(generated, ids), "greedy decoding of each class must reproduce its training sequence"


def test_regression_nll_decreases_when_overfitting():
    torch.manual_seed(0)
    model = NefGPTForWeightRegression(regression_config())
    chunks = torch.randn(4, 8, 5, generator=torch.Generator().manual_seed(2)) * model.chunk_mask()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(labels=chunks).loss.item()
    for _ in range(120):
        loss = model(labels=chunks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first - 1.0, (first, loss.item())


def test_regression_padding_is_ignored_by_the_loss():
    torch.manual_seed(0)
    model = NefGPTForWeightRegression(regression_config()).eval()
    chunks = torch.randn(2, 8, 5) * model.chunk_mask()
    noisy = chunks + 100.0 * (~model.chunk_mask()).float()
    with torch.no_grad():
        assert torch.equal(model(chunks=chunks[:, :-1], labels=chunks).loss,
                           model(chunks=chunks[:, :-1], labels=noisy).loss)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_regression_sampling_is_seeded_stochastic_and_cache_exact(tmp_path, covariance):
    torch.manual_seed(0)
    model = NefGPTForWeightRegression(regression_config(num_classes=2, mixture_covariance=covariance)).eval()
    first = model.sample(4, seed=0)
    assert first.shape == (4, 8, 5)
    assert torch.equal(first, model.sample(4, seed=0))
    assert not torch.allclose(first, model.sample(4, seed=1))
    assert not torch.allclose(first[0], first[1]), "samples of one call must differ"
    assert (first[~model.chunk_mask().expand_as(first)] == 0).all(), "padded entries must be zero"
    torch.testing.assert_close(model.sample(4, seed=0, use_cache=False), first, atol=1e-4, rtol=1e-4)
    conditional = model.sample(3, seed=0, class_labels=torch.tensor([0, 1, 1]), temperature=0.5)
    assert conditional.shape == (3, 8, 5)
    model.save_pretrained(tmp_path)
    loaded = NefGPTForWeightRegression.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.sample(4, seed=0), first)


def full_covariance_model(seed: int = 0, **overrides) -> NefGPTForWeightRegression:
    """A full-covariance head whose Cholesky factors are far from diagonal (the head's bias drawn at random)."""
    torch.manual_seed(seed)
    model = NefGPTForWeightRegression(regression_config(mixture_covariance="full", **overrides)).eval()
    with torch.no_grad():
        model.head.mixture_proj.bias.normal_(0.0, 0.7)
    return model


@pytest.mark.parametrize("mask_kind", ["config", "scattered"])
def test_full_covariance_nll_is_that_of_a_mixture_of_multivariate_normals(mask_kind):
    """Brute force: per (field, position), each component's MultivariateNormal over the real entries, with the
    rows and columns of those entries of its Cholesky factor; padded entries, prefix or scattered, count nothing."""
    model = full_covariance_model()
    chunks = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(1))
    mask = model.chunk_mask().expand(3, -1, -1).clone()
    if mask_kind == "scattered":
        mask = torch.rand(3, 8, 5, generator=torch.Generator().manual_seed(2)) < 0.6
        mask[0, 0] = False  # a chunk with no real entry
    with torch.no_grad():
        out = model(labels=chunks, chunk_mask=mask)
    assert out.scale_tril.shape == (3, 8, 3, 5, 5)
    rows, cols = torch.tril_indices(5, 5, offset=-1)
    assert out.scale_tril.triu(1).abs().sum() == 0 and out.scale_tril[..., rows, cols].abs().min() > 0
    total = torch.zeros((), dtype=torch.float64)
    for b in range(3):
        for t in range(8):
            real = mask[b, t]
            if not real.any():
                continue
            weights = torch.log_softmax(out.mixture_logits[b, t].double(), -1)
            per_component = []
            for k in range(3):
                factor = out.scale_tril[b, t, k].double()[real][:, real]
                normal = torch.distributions.MultivariateNormal(out.means[b, t, k].double()[real], scale_tril=factor)
                per_component.append(weights[k] + normal.log_prob(chunks[b, t].double()[real]))
            total -= torch.logsumexp(torch.stack(per_component), 0)
    torch.testing.assert_close(out.loss.double(), total / mask.sum(), atol=1e-5, rtol=1e-5)


def test_full_covariance_head_with_zero_off_diagonal_is_the_diagonal_head():
    torch.manual_seed(0)
    diagonal = NefGPTForWeightRegression(regression_config()).eval()
    full = NefGPTForWeightRegression(regression_config(mixture_covariance="full")).eval()
    state = diagonal.state_dict()
    rows = state["head.mixture_proj.weight"].shape[0]
    with torch.no_grad():
        for name, tensor in full.state_dict().items():
            if name.startswith("head.mixture_proj."):  # the diagonal head's outputs, then zero off-diagonals
                tensor.zero_()
                tensor[:rows] = state[name]
            else:
                tensor.copy_(state[name])
    chunks = torch.randn(4, 8, 5, generator=torch.Generator().manual_seed(3)) * diagonal.chunk_mask()
    with torch.no_grad():
        torch.testing.assert_close(full(labels=chunks).loss, diagonal(labels=chunks).loss, atol=1e-6, rtol=1e-6)
    for temperature in (1.0, 0.5):
        torch.testing.assert_close(full.sample(6, seed=4, temperature=temperature),
                                   diagonal.sample(6, seed=4, temperature=temperature), atol=1e-6, rtol=1e-6)


def test_full_covariance_samples_have_the_components_covariance_times_the_temperature():
    """One component (the others' logits -30) with a fixed mean and factor L at every position: the samples'
    covariance over a chunk's real entries is T · L_r L_rᵀ."""
    model = full_covariance_model(num_mixtures=2)
    w = model.config.chunk_dim
    factor = torch.tril(torch.randn(w, w, generator=torch.Generator().manual_seed(5))) * 0.5
    factor.diagonal().copy_(torch.linspace(0.3, 1.2, w))
    mean = torch.linspace(-1.0, 1.0, w)
    rows, cols = torch.tril_indices(w, w, offset=-1)
    with torch.no_grad():
        model.head.mixture_proj.weight.zero_()  # layout: logits, means, log stds, below-diagonal entries
        model.head.mixture_proj.bias.copy_(torch.cat([torch.tensor([0.0, -30.0]), mean, mean,
                                                      factor.diagonal().log(), factor.diagonal().log(),
                                                      factor[rows, cols], factor[rows, cols]]))
    for temperature in (1.0, 0.5):
        samples = model.sample(6000, seed=0, temperature=temperature).double()
        for position, width in ((3, 5), (7, 4)):  # a whole chunk, and one whose last entry is padding
            x = samples[:, position, :width]
            expected = temperature * (factor[:width, :width] @ factor[:width, :width].T).double()
            torch.testing.assert_close(x.mean(0), mean[:width].double(), atol=0.05, rtol=0)
            torch.testing.assert_close(torch.cov(x.T), expected, atol=0.06, rtol=0.08)
            assert (samples[:, position, width:] == 0).all()


def test_regression_top_k_samples_only_the_likeliest_components():
    """A head that ignores its input: components 0, 1, 2 with means 0, 10, 20, logits 0.2 > 0.1 > 0 and tiny stds,
    so each sampled entry says which component drew it."""
    torch.manual_seed(0)
    model = NefGPTForWeightRegression(regression_config(num_mixtures=3)).eval()
    k, w = 3, model.config.chunk_dim
    with torch.no_grad():
        model.head.mixture_proj.weight.zero_()
        means = torch.tensor([0.0, 10.0, 20.0])[:, None].expand(k, w)
        model.head.mixture_proj.bias.copy_(torch.cat([torch.tensor([0.2, 0.1, 0.0]), means.flatten(),
                                                      torch.full((k * w,), -6.0)]))
    real = model.chunk_mask().expand(64, -1, -1)

    def components(**kwargs) -> set:
        entries = model.sample(64, seed=0, **kwargs)[real]
        return set(torch.round(entries / 10).long().unique().tolist())

    assert components() == {0, 1, 2}
    assert components(top_k=2) == {0, 1}
    assert components(top_k=1) == {0}
    assert torch.equal(model.sample(4, seed=0, top_k=k), model.sample(4, seed=0)), "top_k >= num_mixtures keeps all"
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            model.sample(2, top_k=bad)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(lm):
    too_long = torch.full((1, LENGTH + 1), 5)
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        lm(too_long)
    with pytest.raises(ValueError, match=r"outside|vocabulary is \[0, 20\)"):
        lm(torch.tensor([[BOS, VOCAB + 3]]))
    for bad in (0, -2):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            lm.generate(num_return_sequences=2, top_k=bad)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            lm.generate(num_return_sequences=2, temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(num_return_sequences=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"class label 3 is outside the trained classes \[0, 3\)"):
        lm.generate(class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class label -1"):
        lm(random_sequences(1), class_labels=torch.tensor([-1]))
    unconditional = NefGPTForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(random_sequences(1), class_labels=torch.tensor([0]))
    regression = NefGPTForWeightRegression(regression_config(num_classes=2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        regression.sample(2, temperature=0)
    with pytest.raises(ValueError, match="outside the trained classes"):
        regression.sample(2, class_labels=torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="chunk_dim=5"):
        regression(labels=torch.zeros(1, 8, 4))


def test_corrupt_or_incomplete_checkpoints_raise(lm, tmp_path):
    good = tmp_path / "good"
    lm.save_pretrained(good)

    def variant(name, change):
        folder = tmp_path / name
        folder.mkdir()
        for file in good.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        change(folder)
        return folder

    no_config = variant("no_config", lambda f: (f / "config.json").unlink())
    no_weights = variant("no_weights", lambda f: (f / "model.safetensors").unlink())
    truncated = variant("truncated", lambda f: (f / "model.safetensors").write_bytes(
        (good / "model.safetensors").read_bytes()[:500]))

    def drop_tensor(folder):
        weights = load_file(folder / "model.safetensors")
        weights.pop("model.layers.0.attn.qkv_proj.weight")
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    incomplete = variant("incomplete", drop_tensor)
    with pytest.raises(OSError, match="no config.json"):
        NefGPTForCausalLM.from_pretrained(no_config)
    with pytest.raises(OSError, match="model.safetensors"):
        NefGPTForCausalLM.from_pretrained(no_weights)
    with pytest.raises(OSError, match="corrupt or truncated"):
        NefGPTForCausalLM.from_pretrained(truncated)
    with pytest.raises(OSError, match="lacks 1 weights"):
        NefGPTForCausalLM.from_pretrained(incomplete)


def test_tokenizer_that_does_not_match_the_model_is_refused():
    config = tiny_config()

    class StandIn:  # the duck-typed surface `check_tokenizer` reads
        bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

        def __init__(self, size, structure):
            self.size, self.structure = size, structure

        def __len__(self):
            return self.size

        def structure_ids(self):
            return self.structure

    matching = {key[len("token_"):]: torch.tensor(value) for key, value in STRUCTURE.items()}
    config.check_tokenizer(StandIn(VOCAB, matching))
    with pytest.raises(ValueError, match="the tokenizer has 30 token ids but the model's vocab_size is 20"):
        config.check_tokenizer(StandIn(30, matching))
    with pytest.raises(ValueError, match="token_level_ids differ"):
        config.check_tokenizer(StandIn(VOCAB, {**matching, "level_ids": torch.zeros(LENGTH)}))
    other_bos = StandIn(VOCAB, matching)
    other_bos.bos_token_id = 7
    with pytest.raises(ValueError, match="bos_token_id: model 1, tokenizer 7"):
        config.check_tokenizer(other_bos)
