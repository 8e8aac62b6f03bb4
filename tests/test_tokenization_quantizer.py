"""ResidualVQ: decode(encode) is the quantised output, masked distances ignore padding, codes recover clusters."""

import pytest
import torch

from nef_transformers.tokenization.quantizer import ResidualVQ, masked_nearest, perplexity


def brute_force_nearest(x, mask, codebook):
    distance = ((x[:, None, :] - codebook[None]) ** 2 * mask[:, None, :].float()).sum(-1)  # (n, k)
    return distance, distance.argmin(1)


def test_masked_nearest_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator)
    mask = torch.rand(500, 6, generator=generator) > 0.3
    x = x * mask
    codebook = torch.randn(40, 6, generator=generator)
    distance, expected = brute_force_nearest(x, mask, codebook)
    got = masked_nearest(x, mask, codebook)
    # same code, or a code at the same distance (ties)
    assert torch.allclose(distance.gather(1, got[:, None]), distance.gather(1, expected[:, None]), atol=1e-5)


def test_scalar_nearest_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 1, generator=generator) * 3
    codebook = torch.randn(64, 1, generator=generator)
    distance, expected = brute_force_nearest(x, torch.ones_like(x, dtype=torch.bool), codebook)
    got = masked_nearest(x, torch.ones_like(x), codebook)
    assert torch.equal(distance.gather(1, got[:, None]), distance.gather(1, expected[:, None]))


def clustered(num=3000, dim=5, clusters=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator) * 5
    labels = torch.randint(clusters, (num,), generator=generator)
    return centres, centres[labels] + 0.01 * torch.randn(num, dim, generator=generator)


def test_decode_of_codes_equals_quantized_output():
    _, x = clustered()
    mask = torch.ones_like(x, dtype=torch.bool)
    groups = torch.zeros(len(x), dtype=torch.long)
    vq = ResidualVQ(5, codebook_size=16, levels_per_group=[3])
    vq.fit(x, mask, groups, epochs=2, batch_size=512, progress=False)
    quantized, codes = vq(x, mask, groups)
    assert codes.shape == (len(x), 3)
    assert torch.allclose(quantized, vq.decode(codes, groups, mask))
    # the decoded vector is the sum of one codebook row per level
    manual = sum(vq.codebooks[level, 0, codes[:, level]] for level in range(3))
    assert torch.allclose(quantized, manual)


def test_codes_recover_well_separated_clusters():
    centres, x = clustered()
    mask = torch.ones_like(x, dtype=torch.bool)
    groups = torch.zeros(len(x), dtype=torch.long)
    vq = ResidualVQ(5, codebook_size=8, levels_per_group=[1], dead_code_threshold=0.5)
    vq.fit(x, mask, groups, epochs=2, batch_size=1000, progress=False)
    quantized, codes = vq(x, mask, groups)
    assert (quantized - x).abs().max() < 0.1  # noise is 0.01; a wrong cluster would be off by ~5
    usage = vq.usage(codes, groups)
    assert usage["codes_in_use"] == 1.0
    assert perplexity(codes[:, 0], 8) > 7.0


def test_padding_never_changes_the_code():
    _, x = clustered(dim=6)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[::2, 3:] = False  # every other vector is a short chunk
    x = x * mask
    groups = torch.zeros(len(x), dtype=torch.long)
    vq = ResidualVQ(6, codebook_size=16, levels_per_group=[2])
    vq.fit(x, mask, groups, epochs=1, batch_size=1000, progress=False)
    codes = vq.encode(x, mask, groups)
    padded = torch.where(mask, x, torch.full_like(x, 50.0))
    assert torch.equal(vq.encode(padded, mask, groups), codes)
    assert torch.all(vq.decode(codes, groups, mask)[~mask] == 0)


def test_groups_have_their_own_codebooks_and_levels():
    _, x = clustered(num=2000)
    mask = torch.ones_like(x, dtype=torch.bool)
    groups = torch.arange(len(x)) % 2
    vq = ResidualVQ(5, codebook_size=8, levels_per_group=[1, 3])
    vq.fit(x, mask, groups, epochs=1, batch_size=500, progress=False)
    codes = vq.encode(x, mask, groups)
    assert torch.all(codes[groups == 0, 1:] == -1)
    assert torch.all(codes[groups == 1] >= 0)
    manual = vq.codebooks[0, 0, codes[groups == 0, 0]]
    assert torch.allclose(vq.decode(codes, groups)[groups == 0], manual)


def test_errors():
    with pytest.raises(ValueError, match="codebook_size"):
        ResidualVQ(4, codebook_size=1)
    vq = ResidualVQ(4, codebook_size=4)
    x = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="not been trained"):
        vq.encode(x, torch.ones_like(x), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        vq.fit(torch.zeros(3, 5), torch.ones(3, 5), torch.zeros(3, dtype=torch.long), progress=False)
