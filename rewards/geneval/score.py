"""Score a GenEval image folder: one official results row per image.

Layout (official): ``<imagedir>/<index:05d>/metadata.jsonl`` + ``samples/<n:05d>.png``.
Unlike the official script, problems are errors, never skips: a prompt folder without
``samples/`` or without images, an image that does not open, or an empty ``imagedir``
raise :class:`GenEvalInputError`. Folders and images are visited in sorted order.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps

from .detection import Detector
from .metadata import GenEvalInputError, read_prompt_metadata
from .rules import ColorFn, Thresholds, evaluate

_IMAGE_RE = re.compile(r"\d+\.png")


@dataclass
class PromptFolder:
    """One prompt's folder: its metadata and its sample paths."""

    path: Path
    metadata: dict
    images: list[Path]


def find_prompt_folders(imagedir: str | Path) -> list[PromptFolder]:
    """All numeric prompt folders of ``imagedir``, validated (see module docstring)."""
    root = Path(imagedir)
    if not root.is_dir():
        raise GenEvalInputError(f"image folder {root} does not exist")
    folders = []
    for sub in sorted(os.listdir(root)):
        folder = root / sub
        if not sub.isdigit() or not folder.is_dir():
            continue
        meta = read_prompt_metadata(folder)
        samples = folder / "samples"
        if not samples.is_dir():
            raise GenEvalInputError(f"missing image folder {samples}")
        images = sorted(samples / n for n in os.listdir(samples) if _IMAGE_RE.fullmatch(n) and (samples / n).is_file())
        if not images:
            raise GenEvalInputError(f"no <n>.png images in {samples}")
        folders.append(PromptFolder(folder, meta, images))
    if not folders:
        raise GenEvalInputError(f"no prompt folders (<index>/metadata.jsonl) in {root}")
    return folders


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image (EXIF-transposed, as the official code); errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).copy()
    except Exception as e:  # PIL raises many types for corrupt files
        raise GenEvalInputError(f"cannot read image {path}: {e}") from None


def score_folder(folder: PromptFolder, detector: Detector, color_fn: ColorFn | None = None,
                 thresholds: Thresholds = Thresholds()) -> list[dict]:
    """Official result rows for one prompt folder."""
    images = [open_image(p) for p in folder.images]
    all_dets = detector(images)
    if len(all_dets) != len(images):
        raise RuntimeError(f"detector returned {len(all_dets)} results for {len(images)} images")
    rows = []
    for path, image, dets in zip(folder.images, images, all_dets):
        r = evaluate(dets, folder.metadata, image=image, color_fn=color_fn, thresholds=thresholds)
        rows.append({
            "filename": str(path),
            "tag": folder.metadata["tag"],
            "prompt": folder.metadata["prompt"],
            "correct": bool(r.correct),
            "reason": r.reason,
            "metadata": json.dumps(folder.metadata),
            "details": json.dumps(r.details),
        })
    return rows


def score_images(imagedir: str | Path, detector: Detector, color_fn: ColorFn | None = None,
                 thresholds: Thresholds = Thresholds()) -> Iterator[dict]:
    """Rows for every image under ``imagedir`` (the whole tree is validated before any detection)."""
    folders = find_prompt_folders(imagedir)
    for folder in folders:
        yield from score_folder(folder, detector, color_fn, thresholds)


def write_results(rows: Iterator[dict] | list[dict], outfile: str | Path, overwrite: bool = False) -> int:
    """Write rows as JSONL atomically (temp file + rename); refuses to replace ``outfile`` unless ``overwrite``."""
    out = Path(outfile)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as fp:
            for row in rows:
                fp.write(json.dumps(row) + "\n")
                n += 1
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


__all__ = ["PromptFolder", "find_prompt_folders", "open_image", "score_folder", "score_images", "write_results"]
