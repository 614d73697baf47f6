"""Augmentations: shape, dtype and device kept, seeded, and each family does what it says."""

import pytest
import torch

from oclust.model.augment import (
    augment,
    augment_images,
    augment_vectors,
    augment_windows,
    kind_for_shape,
)

SHAPES = {"vector": (16, 64), "window": (16, 6, 100), "image": (16, 8, 8)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_are_preserved(kind, dtype):
    x = torch.randn(SHAPES[kind], generator=_gen(9)).to(dtype)
    out = augment(x, _gen(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert not torch.equal(out, x)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_same_seed_same_view_other_seed_other_view(kind):
    x = torch.randn(SHAPES[kind], generator=_gen(9))
    assert torch.equal(augment(x, _gen(1)), augment(x, _gen(1)))
    assert not torch.equal(augment(x, _gen(1)), augment(x, _gen(2)))


def test_family_follows_the_per_sample_shape():
    assert kind_for_shape((18,)) == "vector"
    assert kind_for_shape((6, 100)) == "window"
    assert kind_for_shape((28, 28)) == "image"
    assert kind_for_shape((1, 28, 28)) == "image"


def test_image_with_channel_axis_and_forced_kind():
    x = torch.randn(4, 3, 10, 10, generator=_gen(0))
    assert augment(x, _gen(1)).shape == x.shape
    assert augment(torch.randn(4, 6, 100), _gen(1), kind="vector").shape == (4, 6, 100)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="floating-point"):
        augment(torch.ones(2, 3, dtype=torch.int64), _gen(0))
    with pytest.raises(ValueError, match="unknown augmentation kind"):
        augment(torch.ones(2, 3), _gen(0), kind="audio")
    with pytest.raises(ValueError, match=r"\(N, C, T\)"):
        augment_windows(torch.ones(2, 3), _gen(0))


def test_window_transforms_are_channel_consistent():
    # Identical channels stay identical when only scaling, warp and shift act (no jitter).
    base = torch.randn(8, 1, 50, generator=_gen(0))
    x = base.expand(8, 4, 50).contiguous()
    out = augment_windows(x, _gen(3), jitter=0.0)
    assert torch.allclose(out, out[:, :1].expand_as(out))
    assert not torch.allclose(out, x)


def test_window_time_shift_is_a_circular_roll():
    x = torch.arange(20.0).repeat(3, 2, 1)  # (3, 2, 20)
    out = augment_windows(x, _gen(5), jitter=0.0, scale=0.0, warp=0.0, max_shift=0.25)
    for row in out:
        shift = int((row[0, 0] - x[0, 0, 0]).item()) % 20
        assert torch.equal(row, x[0].roll(-shift, dims=1))


def test_image_shift_moves_pixels_without_noise():
    x = torch.zeros(32, 7, 7)
    x[:, 3, 3] = 1.0  # one bright pixel in the centre
    out = augment_images(x, _gen(0), max_shift=1, noise=0.0)
    assert torch.equal(out.sum((1, 2)), torch.ones(32))  # one pixel moved, none lost
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 7, pos % 7
    assert rows.min() >= 2 and rows.max() <= 4 and cols.min() >= 2 and cols.max() <= 4
    assert len(set(pos.tolist())) > 1  # not all shifted alike


def test_vector_dropout_and_noise_strengths():
    x = torch.ones(200, 50)
    out = augment_vectors(x, _gen(0), noise=0.0, dropout=0.3)
    assert abs((out == 0).double().mean().item() - 0.3) < 0.03
    noisy = augment_vectors(x, _gen(0), noise=0.5, dropout=0.0)
    assert abs((noisy - x).std().item() - 0.5) < 0.03
