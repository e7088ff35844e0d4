"""Test-wide settings: offline, deterministic, a private cache for the tiny models."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test process (pytest-xdist runs one process per core): tiny models are
# dominated by threading overhead, and oversubscribed cores slow them down by 10-100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FPO_DIFFUSION_CACHE", tempfile.mkdtemp(prefix="fpo-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Fuzzing (tests/test_fuzz_inputs.py): CI draws the same examples on every run (derandomized: the
# seed comes from each test's name, no example database), so a failure there is a change in the code,
# never the luck of a draw. FPO_FUZZ=1 fuzzes freely: fresh random examples each run, remembered in
# .hypothesis/ (a failure prints the seed; rerun with --hypothesis-seed=N).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
FUZZ_PROFILE = "fuzz" if os.environ.get("FPO_FUZZ", "").strip() not in ("", "0") else "ci"
settings.load_profile(FUZZ_PROFILE)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test builds its Accelerator from scratch: accelerate keeps one process-wide state, and a test
    that trained in bf16 must not decide the precision of the next test in the same worker."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield


@pytest.fixture
def launch_script(capsys):
    """``run(script, argv) -> (exit code, stderr lines)``: ``launch/<script>.py``'s ``main`` through ``run_cli``,
    as its command line runs it."""
    import importlib
    import sys
    from pathlib import Path

    from fpo_diffusion.cli import run_cli

    launch = str(Path(__file__).resolve().parents[1] / "launch")
    if launch not in sys.path:
        sys.path.insert(0, launch)

    def run(script: str, argv: list[str]):
        rc = run_cli(importlib.import_module(script).main, argv, prog=script)
        return rc, capsys.readouterr().err.strip().splitlines()

    return run
