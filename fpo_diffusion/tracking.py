"""Run logging: a JSONL metrics file always, TensorBoard by default, W&B on request."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image


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
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) < iteration:
                        keep.append(line)
                except json.JSONDecodeError:  # a row cut short by a kill
                    pass
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            tmp.replace(path)

    def log(self, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"iteration": step, **{k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def log_samples(self, rows: list[dict]) -> None:
        """Append one JSON row per sample to ``samples.jsonl`` (each row carries its ``iteration``)."""
        if not self.enabled:
            return
        with (self.out_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        img_dir = self.out_dir / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        image.save(img_dir / f"{tag.replace('/', '_')}_{step:06d}.png")
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
