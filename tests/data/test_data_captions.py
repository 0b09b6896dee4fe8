"""Digit captions: stroke width and slant measured on drawn bars of known width and shear."""

import pytest
import torch

from diffusion_apps.data.captions import describe, slant, stroke_width


def bar(width: int, shear: float = 0.0, length: int = 20, size: int = 32) -> torch.Tensor:
    """A white bar on black, ``width`` px wide and ``length`` rows tall, its column shifted by
    ``shear`` px per row upwards (top to the right for shear > 0); values in [−1, 1]."""
    img = torch.full((1, 1, size, size), -1.0)
    top = (size - length) // 2
    for r in range(top, top + length):
        left = round(size / 2 - width / 2 + shear * (top + length / 2 - r))
        img[..., r, left : left + width] = 1.0
    return img


@pytest.mark.parametrize("width", [2, 3, 5])
def test_stroke_width_of_a_bar_is_its_width(width):
    length = 20
    # ink = w·l; edges: two sides of length l, plus the two ends of width w.
    expected = 2 * width * length / (2 * length + 2 * width)
    assert stroke_width(bar(width, length=length)).item() == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("shear", [-0.4, 0.0, 0.3])
def test_slant_of_a_sheared_bar_is_its_shear(shear):
    assert slant(bar(3, shear)).item() == pytest.approx(shear, abs=0.03)


def test_captions_name_the_measured_properties_and_drop_words():
    images = torch.cat([bar(5, 0.4), bar(1, 0.0)])
    labels = torch.tensor([7, 1])
    assert describe(images, labels) == ["thick slanted seven", "thin upright one"]
    assert describe(images, labels, drop=1.0) == ["seven", "one"]
    with pytest.raises(ValueError, match="0..9"):
        describe(images, torch.tensor([-1, 1]))
