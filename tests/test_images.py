"""Image helpers: the foreground share's threshold is the documented one."""
import numpy as np
from PIL import Image

from fpo_diffusion.images import FOREGROUND_TOLERANCE, foreground_share


def _image(patch_value: int, background: int = 100) -> Image.Image:
    a = np.full((10, 10, 3), background, dtype=np.uint8)
    a[:5, 5:, 1] = background + patch_value  # a quarter of the pixels, one channel changed
    return Image.fromarray(a)


def test_foreground_is_a_channel_differing_by_more_than_the_tolerance():
    assert FOREGROUND_TOLERANCE == 40
    assert foreground_share([_image(FOREGROUND_TOLERANCE)]) == 0.0
    assert foreground_share([_image(FOREGROUND_TOLERANCE + 1)]) == 0.25
    assert foreground_share([_image(-(FOREGROUND_TOLERANCE + 1))]) == 0.25
    # the mean over images; an explicit background overrides the corner pixel
    assert foreground_share([_image(41), _image(0)]) == 0.125
    assert foreground_share([_image(0)], background=(0, 0, 0)) == 1.0
    assert foreground_share([]) == 0.0
