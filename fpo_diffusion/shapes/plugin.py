"""How the shapes world plugs into the toolkit by name (entry points in ``pyproject.toml``).

* model ``embedded:shapes`` (group ``fpo_diffusion.models``): :func:`model`;
* prompt sources ``embedded:shapes`` (the RL training prompts), ``embedded:shapes-counting`` (those of
  the counting task), ``embedded:shapes-validation`` / ``embedded:shapes-test`` (group
  ``fpo_diffusion.prompts``);
* reward ``shapes`` (group ``fpo_diffusion.rewards``): :mod:`fpo_diffusion.shapes.reward`.

The core never imports this package; it looks the names up through the entry points.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "shapes_sd3"
"""The shipped, pretrained shapes text-to-image model (a stock ``StableDiffusion3Pipeline`` folder; built and
loaded by ``model.py``). Here, so that naming it imports nothing heavy."""


def model() -> dict:
    """The shipped model: family and folder.

    The model was trained without T5 (its ``text_encoder_3`` is a null encoder whose output is
    exactly zero), so the SD3 policy replaces the pipeline's 256 zero context tokens by one token with
    its attention logit raised by ``log(256)``: identical results, several times cheaper
    (``policies.sd3.has_null_t5``; so does any copy or re-pretraining of it).
    """
    if not (DEFAULT_ASSET / "model_index.json").is_file():
        from fpo_diffusion.errors import PathNotFoundError

        raise PathNotFoundError(f"the embedded shapes model is missing at {DEFAULT_ASSET}")
    return {"family": "sd3", "path": str(DEFAULT_ASSET)}


def training_prompts() -> list[dict]:
    """``embedded:shapes``: the RL training prompt set, 2000 GenEval-format entries of the five tasks with
    training prompts in Flow-GRPO's GenEval task mix (``scenes.TRAINING_TASK_MIX``: position 700, counting 500,
    color_attr 500, two_object 200, colors 100), never a test or validation prompt; fixed and seeded."""
    from fpo_diffusion.prompts import PromptItem, weight_tasks

    from .scenes import TRAINING_TASK_MIX, training_metadata

    items = weight_tasks([PromptItem(m["prompt"], m) for m in training_metadata()], TRAINING_TASK_MIX, "embedded:shapes")
    return [it.metadata for it in items]


def counting_training_prompts() -> list[dict]:
    """``embedded:shapes-counting``: the training prompts of the counting task (400 entries of 12 prompts), what
    the counting job trains on (``launch/configs/shapes_counting.yaml``): the task the base model is worst at.
    The same prompts as ``embedded:shapes`` with ``prompts.tags: [counting]``, in equal shares (400, not 500)."""
    from .scenes import training_metadata

    return [m for m in training_metadata() if m["tag"] == "counting"]


def validation_prompts() -> list[dict]:
    """``embedded:shapes-validation``: the validation split (for evaluation during training and tuning),
    its six tasks interleaved, so that the first N entries are an even mix of tasks."""
    from .scenes import TASKS, validation_metadata

    by_task = {t: [m for m in validation_metadata() if m["tag"] == t] for t in TASKS}
    out = []
    for i in range(max(len(v) for v in by_task.values())):
        out.extend(v[i] for v in by_task.values() if i < len(v))
    return out


def test_prompts() -> list[dict]:
    """``embedded:shapes-test``: the ShapesEval test split (report results on it; never tune on it)."""
    from .scenes import test_metadata

    return test_metadata()
