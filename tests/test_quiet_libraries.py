"""A training run hides the libraries' known noise only, never every FutureWarning/DeprecationWarning."""
import warnings

from fpo_diffusion.cli import NOISY_WARNINGS, quiet_libraries


def test_quiet_libraries_hides_known_noise_and_nothing_else():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("__array__ implementation doesn't accept a copy keyword, so passing copy=False "
                               "failed.", DeprecationWarning, "scheduling_euler_discrete.py", 1,
                               module="diffusers.schedulers.scheduling_euler_discrete")
        assert caught == []  # the known noise is hidden
        warnings.warn_explicit("`torch_dtype` is deprecated and will be removed in version 1.0.0.", FutureWarning,
                               "pipeline_utils.py", 1, module="diffusers.pipelines.pipeline_utils")
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="fpo_diffusion.x")
        warnings.warn_explicit("__array__ implementation doesn't accept a copy keyword", DeprecationWarning,
                               "ours.py", 1, module="fpo_diffusion.ours")  # the same words from our own code show
    assert [str(w.message)[:10] for w in caught] == ["`torch_dty", "old API", "__array__ "]
    assert all(cat in (DeprecationWarning, FutureWarning, UserWarning) for cat, _, _ in NOISY_WARNINGS)
