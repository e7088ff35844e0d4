"""CI's fuzzing is deterministic (issue 16.7): the ``ci`` hypothesis profile is the default, ``FPO_FUZZ=1``
selects free fuzzing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent


def _draws() -> list:
    seen = []

    @settings(max_examples=20)
    @given(st.integers(), st.text(max_size=5))
    def prop(i, t):
        seen.append((i, t))

    prop()
    return seen


@pytest.mark.skipif(os.environ.get("FPO_FUZZ", "").strip() not in ("", "0"), reason="FPO_FUZZ set: fuzzing freely")
def test_ci_profile_is_the_default_and_draws_the_same_examples_every_run():
    assert settings.default.derandomize and settings.default.database is None
    from test_fuzz_inputs import FUZZ

    assert FUZZ.derandomize  # the fuzz tests' own settings inherit the profile
    assert _draws() == _draws()  # the same examples on every run (random draws would differ)


def test_fpo_fuzz_selects_free_fuzzing():
    code = "import conftest; from hypothesis import settings; print(conftest.FUZZ_PROFILE, settings.default.derandomize)"
    env = {**os.environ, "FPO_FUZZ": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["fuzz", "False"]
