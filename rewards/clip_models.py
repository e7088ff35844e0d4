"""Shared loaders for the CLIP-family reward models.

Everything heavy is imported inside functions so that importing a reward module (which
the registry does on every lookup) stays cheap.

* :func:`resolve_file` turns "local path or (hub repo, filename) or URL" into a local file.
* :func:`load_hf_clip` loads a ``transformers`` CLIP model + processor (PickScore, aesthetic).
* :func:`load_open_clip` loads an ``open_clip`` model, its eval transform and tokenizer
  (HPSv2, CLIP score).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(images: list[Image.Image]) -> list[Image.Image]:
    """Convert every image to RGB (rewards accept any PIL mode)."""
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def resolve_file(path_or_repo: str, filename: str | None = None, url: str | None = None,
                 cache_dir: str | None = None) -> str:
    """Return a local path for a checkpoint file.

    ``path_or_repo`` is either an existing local file, an existing local directory holding
    ``filename``, or a Hugging Face hub repo id from which ``filename`` is downloaded. If ``url``
    is given and the path does not exist locally, the file is downloaded from that URL into
    ``cache_dir`` (default ``~/.cache/fpo_diffusion``).
    """
    p = Path(os.path.expanduser(path_or_repo))
    if p.is_file():
        return str(p)
    if p.is_dir():
        if filename is None or not (p / filename).is_file():
            raise FileNotFoundError(f"{p} is a directory without {filename!r}")
        return str(p / filename)
    if url is not None:
        cache = Path(cache_dir or os.path.expanduser("~/.cache/fpo_diffusion"))
        cache.mkdir(parents=True, exist_ok=True)
        dest = cache / (filename or url.rsplit("/", 1)[-1])
        if not dest.is_file():
            torch.hub.download_url_to_file(url, str(dest))
        return str(dest)
    if filename is None:
        raise FileNotFoundError(f"no such file: {path_or_repo}")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, filename, cache_dir=cache_dir)


def load_hf_clip(model: str, processor: str | None, device: torch.device) -> tuple[Any, Any]:
    """Load a ``transformers`` CLIPModel (eval mode, on ``device``) and its processor.

    ``model`` / ``processor`` are hub ids or local ``save_pretrained`` folders; ``processor``
    defaults to ``model``.
    """
    from transformers import AutoProcessor, CLIPModel

    m = CLIPModel.from_pretrained(model).to(device).eval()
    m.requires_grad_(False)
    proc = AutoProcessor.from_pretrained(processor or model)
    return m, proc


def hf_clip_features(model: Any, processor: Any, images: list[Image.Image] | None,
                     prompts: list[str] | None, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised image / text embeddings (float32) from a ``transformers`` CLIP model."""
    img = txt = None
    if images is not None:
        inputs = processor(images=to_rgb(images), return_tensors="pt")
        pix = inputs["pixel_values"].to(device=device, dtype=model.dtype)
        img = _as_tensor(model.get_image_features(pixel_values=pix)).float()
        img = img / img.norm(dim=-1, keepdim=True)
    if prompts is not None:
        max_len = min(int(processor.tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
        inputs = processor(text=list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        txt = _as_tensor(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                 attention_mask=inputs["attention_mask"].to(device))).float()
        txt = txt / txt.norm(dim=-1, keepdim=True)
    return img, txt


def _as_tensor(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and may return an output object in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device,
                   preprocess: str = "open_clip") -> tuple[Any, Callable[[Image.Image], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    """Load an ``open_clip`` model (eval mode, fp32, on ``device``), an image transform and tokenizer.

    ``model_name`` is a built-in name (``"ViT-H-14"``), ``"hf-hub:org/repo"`` or
    ``"local-dir:/path"`` (folder with ``open_clip_config.json`` and weights); ``pretrained``
    is a tag (``"laion2b_s32b_b79k"``), a local checkpoint file, or None (random init, used
    when a full state dict is loaded afterwards, as for HPSv2).

    ``preprocess="open_clip"`` uses the model's own eval transform; ``"hps"`` reproduces
    HPSv2's validation transform (ToTensor, bicubic Resize on the tensor, CenterCrop,
    OpenAI mean/std).
    """
    import open_clip

    model, _, preprocess_val = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model = model.eval()
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    if preprocess == "hps":
        from torchvision import transforms as T

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        preprocess_val = T.Compose([
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ])
    return model, preprocess_val, tokenizer


def open_clip_features(model: Any, preprocess: Callable, tokenizer: Callable, images: list[Image.Image],
                       prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings (float32) from an ``open_clip`` model."""
    pix = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)
    tok = tokenizer(list(prompts)).to(device)
    img = model.encode_image(pix).float()
    txt = model.encode_text(tok).float()
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
