"""Slices onto the model's grid and back: square and non-square inputs, channel repeat."""

import pytest
import torch

from c2f_med.slices import from_model_grid, repeat_channels, to_model_grid


@pytest.mark.parametrize(("shape", "size", "side"), [((30, 50), 64, (50, 50)), ((30, 50), (32, 48), (33, 50)),
                                                     ((60, 20), (48, 32), (60, 40))])
def test_round_trip_keeps_a_smooth_slice(shape, size, side):
    h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = (yy + 2 * xx)[None, None]
    x, geom = to_model_grid(smooth, size)
    assert x.shape[-2:] == ((size, size) if isinstance(size, int) else size) and geom.side == side
    back = from_model_grid(x[:, 0], geom)
    assert back.shape == (1, h, w)
    assert (back - smooth[:, 0]).abs()[:, 2:-2, 2:-2].max() < 0.05


def test_repeat_channels_sends_gradients_back_to_the_gray_channel():
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    y = repeat_channels(x, 3)
    assert y.shape == (2, 3, 4, 4)
    (y * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    assert repeat_channels(x, 1) is x
    with pytest.raises(ValueError):
        repeat_channels(torch.zeros(1, 2, 4, 4), 3)


def test_evenly_spread_picks_distinct_indices_from_first_to_last():
    from c2f_med.slices import evenly_spread

    assert evenly_spread(10, 3) == [0, 4, 9]  # positions 0, 4.5, 9; halves round to even
    assert evenly_spread(5, 8) == [0, 1, 2, 3, 4]  # never more than n
    assert evenly_spread(7, 1) == [0] and evenly_spread(7, 0) == [] and evenly_spread(0, 3) == []
    picked = evenly_spread(100, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 99 and picked == sorted(set(picked))


def test_volume_slices_with_context_stack_each_slice_between_its_neighbours():
    from c2f_med.slices import volume_slices

    volume = torch.arange(5.0).view(1, 1, 5).expand(3, 4, 5)  # slice i along axis 2 holds the value i
    plain = volume_slices(volume, 2)
    assert plain.shape == (5, 1, 3, 4) and plain[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    wide = volume_slices(volume, 2, [0, 2, 4], context=2)
    assert wide.shape == (3, 5, 3, 4)
    assert wide[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4, 4, 4]]  # edges repeated
    torch.testing.assert_close(wide[:, 2:3], volume_slices(volume, 2, [0, 2, 4]))  # the middle is the slice
    along_x = volume_slices(torch.arange(3.0).view(3, 1, 1).expand(3, 4, 5), 0, context=1)
    assert along_x.shape == (3, 3, 4, 5) and along_x[1, :, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="context"):
        volume_slices(volume, 2, context=-1)
