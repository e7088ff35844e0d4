"""MultiReward: weighted sum equals the components, lazy building, background scoring, loud failures."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import Reward, RewardError
from rewards.multi import MultiReward, build_multi_reward
from rewards.registry import build_reward, register_reward


@register_reward("test_mean_brightness")
class MeanBrightness(Reward):
    """Mean pixel value / 255. Range [0, 1]. Counts its constructions."""

    range = (0.0, 1.0)
    built = 0

    def __init__(self, offset: float = 0.0, **kw):
        super().__init__(**kw)
        self.offset = offset
        type(self).built += 1

    def score(self, images, prompts, metadata):
        type(self).last_thread = threading.get_ident()
        return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 + self.offset for im in images])


@register_reward("test_nan_reward")
class NanReward(Reward):
    def score(self, images, prompts, metadata):
        return torch.tensor([float("nan")] * len(images))


def images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (24, 24 + 4 * i, 3), dtype=np.uint8)) for i in range(n)]


def test_weighted_sum_equals_components():
    ims, prompts = images(), [f"p{i}" for i in range(5)]
    weights = {"jpeg_incompressibility": 0.5, "jpeg_compressibility": 0.25, "test_mean_brightness": -2.0}
    multi = MultiReward(weights, options={"test_mean_brightness": {"offset": 0.1}})
    total, comps = multi(ims, prompts, [{} for _ in ims])
    assert set(comps) == set(weights)
    for name, w in weights.items():
        opts = {"offset": 0.1} if name == "test_mean_brightness" else {}
        torch.testing.assert_close(comps[name], build_reward(name, **opts)(ims, prompts))
    want = sum(w * comps[n] for n, w in weights.items())
    torch.testing.assert_close(total, want)
    assert total.shape == (5,) and total.dtype == torch.float32


def test_components_build_lazily_once():
    before = MeanBrightness.built
    multi = MultiReward({"test_mean_brightness": 1.0})
    assert MeanBrightness.built == before  # nothing built at construction
    multi(images(2), ["a", "b"])
    multi(images(3), ["a", "b", "c"])
    assert MeanBrightness.built == before + 1


def test_submit_runs_in_background_and_matches():
    ims, prompts = images(), ["x"] * 5
    multi = MultiReward({"jpeg_incompressibility": 1.0, "test_mean_brightness": 3.0})
    fut = multi.submit(ims, prompts)
    assert isinstance(fut, Future)
    total, comps = fut.result(timeout=30)
    assert MeanBrightness.last_thread != threading.get_ident()  # scored off the caller's thread
    want_total, want_comps = multi(ims, prompts)
    torch.testing.assert_close(total, want_total)
    assert set(comps) == set(want_comps)
    for k in want_comps:
        torch.testing.assert_close(comps[k], want_comps[k])
    multi.close()


def test_unknown_reward_is_one_clear_keyerror():
    with pytest.raises(KeyError) as e:
        MultiReward({"pickscroe": 1.0})
    msg = str(e.value)
    assert "unknown reward 'pickscroe'" in msg and "pickscore" in msg and "\n" not in msg


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        MultiReward({"jpeg_compressibility": float("nan")})
    with pytest.raises(ValueError, match="without a weight"):
        MultiReward({"jpeg_compressibility": 1.0}, options={"ocr": {}})
    with pytest.raises(ValueError, match="url"):
        MultiReward({"remote": 1.0})


def test_non_finite_scores_raise_naming_the_reward():
    multi = MultiReward({"jpeg_compressibility": 1.0, "test_nan_reward": 0.1})
    with pytest.raises(RewardError, match="test_nan_reward"):
        multi(images(2), ["a", "b"])
    fut = multi.submit(images(2), ["a", "b"])
    with pytest.raises(RewardError, match="test_nan_reward"):
        fut.result(timeout=30)
    multi.close()


def test_component_exception_becomes_reward_error_naming_it():
    multi = MultiReward({"ocr": 1.0})
    with pytest.raises(RewardError, match="no double-quoted text"):
        multi([Image.new("RGB", (8, 8))], ["a prompt without quotes"])


def test_build_from_config_mapping():
    multi = build_multi_reward({"jpeg_compressibility": 2.0, "test_mean_brightness": {"weight": 0.5, "offset": 1.0}})
    assert multi.weights == {"jpeg_compressibility": 2.0, "test_mean_brightness": 0.5}
    assert multi.options == {"test_mean_brightness": {"offset": 1.0}}
