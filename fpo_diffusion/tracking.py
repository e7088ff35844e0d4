"""Run logging: a JSONL metrics file always, TensorBoard by default, W&B on request.

The JSONL files only ever hold whole rows: an append that fails (disk full) is cut back to the
last whole row and stops the run with one line (:class:`~fpo_diffusion.checkpoint.WriteError`);
a row torn by a kill is dropped on resume (:meth:`RunLogger.truncate_after`, which says so).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from .checkpoint import WriteError, writing


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path``; if the write fails (disk full), cut the file back to where it was (no
    torn row) and raise :class:`WriteError`."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    with writing(path.name):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)


def read_jsonl_rows(path: Path) -> tuple[list[str], int]:
    """The lines of ``path`` that are whole JSON objects, and how many others (torn or garbage) there were."""
    keep, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a kill or a full disk
            row = None
        if isinstance(row, dict):
            keep.append(line)
        elif line.strip():
            torn += 1
    return keep, torn


def config_markdown(config: dict) -> str:
    """The resolved config as TensorBoard text: its YAML (``config.yaml``) as a Markdown code block."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    return "The resolved config (`config.yaml`):\n\n" + "".join("    " + line + "\n" for line in text.splitlines())


class RunLogger:
    """Writes scalars and images for the main process (other ranks get a no-op logger)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "fpo-diffusion", config: dict | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tb"))
            if config is not None:  # the resolved config next to the scalars (TensorBoard's Text tab)
                self.tb.add_text("config", config_markdown(config), 0)
                self.tb.flush()
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("log.wandb=true needs Weights & Biases: pip install 'fpo-diffusion[wandb]'") from None
            self.wandb = wb.init(project=wandb_project, dir=str(self.out_dir), config=config or {})

    def truncate_after(self, iteration: int) -> None:
        """Drop JSONL rows of iterations ``>= iteration`` (they are re-run after a resume)."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.out_dir / "samples.jsonl"):
            if not path.exists():
                continue
            rows, torn = read_jsonl_rows(path)
            keep = [line for line in rows if json.loads(line).get("iteration", 0) < iteration]
            if torn:
                print(f"note: {path.name}: dropped {torn} torn row{'s' if torn > 1 else ''} (a write cut short "
                      f"by a kill or a full disk)", flush=True)
            tmp = path.with_suffix(".jsonl.tmp")
            with writing(f"{path.name} (while dropping the rows to re-run)", partial=tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("".join(l + "\n" for l in keep))
                    f.flush()
                    os.fsync(f.fileno())
            tmp.replace(path)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"iteration": step, **{k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}}
        append_jsonl(self.metrics_path, [row])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def log_samples(self, rows: list[dict]) -> None:
        """Append one JSON row per sample to ``samples.jsonl`` (each row carries its ``iteration``)."""
        if not self.enabled:
            return
        append_jsonl(self.out_dir / "samples.jsonl", rows)

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        img_dir = self.out_dir / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        path = img_dir / f"{tag.replace('/', '_')}_{step:06d}.png"
        with writing(f"image {path.name}", partial=path):
            image.save(path)
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wb

            self.wandb.log({tag: wb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(m: dict[str, float], algorithm: str, recent: list[float]) -> str:
    """The progress bar's text for one iteration: the reward and its running mean, the spread of the
    log-ratio (FPO: ``log rho`` is ~1e-3 per update, a ratio printed as 1.000 says nothing), the clip
    share, and the seconds of rollout and update."""
    fin = [r for r in recent if math.isfinite(r)]
    parts = [f"reward {m.get('reward/mean', float('nan')):.3f}"
             + (f" (mean of last {len(fin)}: {sum(fin) / len(fin):.3f})" if len(fin) > 1 else "")]
    spread = m.get(f"{algorithm}/log_ratio_std")
    if spread is not None:
        parts.append(f"log-ratio std {spread:.2e}")
    lo, hi = m.get(f"{algorithm}/ratio_min"), m.get(f"{algorithm}/ratio_max")
    if lo is not None and hi is not None:
        parts.append(f"ratio [{lo:.5f}, {hi:.5f}]")
    if f"{algorithm}/clip_frac" in m:
        parts.append(f"clip {m[f'{algorithm}/clip_frac']:.3f}")
    if "eval/reward/mean" in m:
        parts.append(f"eval {m['eval/reward/mean']:.3f}")
    parts.append(f"rollout {m.get('perf/rollout_s', float('nan')):.1f}s update {m.get('perf/update_s', float('nan')):.1f}s")
    return " | ".join(parts)


def where_line(out: Path, *, exported: bool, tensorboard: bool) -> str:
    """The run's last line: where its LoRA, checkpoints and TensorBoard logs are."""
    lora = f"LoRA in {out / 'lora'}" if exported else "no LoRA exported yet (stopped early: --resume latest goes on)"
    tb = f", TensorBoard logs in {out / 'tb'} (tensorboard --logdir {out / 'tb'})" if tensorboard else ""
    return f"done: {lora}, checkpoints in {out / 'checkpoints'}{tb}"
