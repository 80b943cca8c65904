"""Perlin-mask properties (docs/design.md §10.4)."""

import torch

from supersimplenet.perlin import next_pow2, perlin_masks, perlin_noise


def test_next_pow2():
    assert [next_pow2(n) for n in (58, 64, 160, 36, 48, 80, 1)] == [64, 64, 256, 64, 64, 128, 1]


def test_noise_range_and_lattice_zeros():
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 1), (2, 8), (4, 32), (32, 16)]:
        noise = perlin_noise((64, 64), (rows, cols), generator=g)
        assert noise.shape == (64, 64)
        assert float(noise.abs().max()) <= 1 + 1e-6
        assert noise[0, 0] == 0
        step_r, step_c = 64 // rows, 64 // cols
        assert torch.allclose(noise[::step_r, ::step_c], torch.zeros(rows, cols), atol=1e-6)


def test_masks_binary_shape_and_empty_at_threshold_one():
    g = torch.Generator().manual_seed(1)
    masks = perlin_masks(16, (64, 58), threshold=0.2, generator=g)
    assert masks.shape == (16, 1, 64, 58)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert perlin_masks(16, (64, 64), threshold=1.0, generator=g).sum() == 0


def test_about_half_empty_and_area_falls_with_threshold():
    g = torch.Generator().manual_seed(2)
    masks = perlin_masks(400, (64, 64), threshold=0.2, generator=g)
    empty = float((masks.flatten(1).sum(1) == 0).float().mean())
    assert 0.45 <= empty <= 0.65
    low = float(perlin_masks(300, (64, 64), threshold=0.2, generator=torch.Generator().manual_seed(3)).mean())
    high = float(perlin_masks(300, (64, 64), threshold=0.6, generator=torch.Generator().manual_seed(3)).mean())
    assert high < low


def test_scales_cover_one_to_thirtytwo(monkeypatch):
    import supersimplenet.perlin as perlin

    seen = set()
    original = perlin.perlin_noise

    def spy(size, scales, **kw):
        seen.update(scales)
        return original(size, scales, **kw)

    monkeypatch.setattr(perlin, "perlin_noise", spy)
    perlin.perlin_masks(200, (64, 64), threshold=0.2, generator=torch.Generator().manual_seed(4))
    assert seen == {1, 2, 4, 8, 16, 32}


def test_fallback_makes_a_mask_where_none_exceeds():
    g = torch.Generator().manual_seed(5)
    plain = perlin_masks(50, (64, 64), threshold=0.99, generator=g)
    g = torch.Generator().manual_seed(5)
    rescaled = perlin_masks(50, (64, 64), threshold=0.99, fallback=True, generator=g)
    assert rescaled.sum() > plain.sum()
