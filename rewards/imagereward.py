"""ImageReward (Xu et al., 2023), loaded onto ``transformers``' BLIP classes.

Decision: the released checkpoint is converted at load time onto
``transformers.BlipVisionModel`` + ``BlipTextModel`` rather than depending on the
``image-reward`` package. That package pins old ``timm``/``fairscale`` and imports
``transformers`` internals (``modeling_utils.apply_chunking_to_forward``) that recent
``transformers`` removed, so it cannot be installed next to this toolkit's
``transformers>=4.50``; the BLIP architecture it uses (ViT + BERT with cross-attention,
``med.py``) is the one ``transformers`` implements, and the key mapping is the one
``transformers``' own BLIP conversion script uses.

Loading, as the authors publish it: hub repo ``THUDM/ImageReward`` with
``ImageReward.pt`` (state dict: ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``) and ``med_config.json`` (the BERT config); tokenizer
``bert-base-uncased`` plus BLIP's ``[DEC]`` bos and ``[ENC]`` tokens. The vision tower's
shape (ViT-L/16 at 224 px for the release) is read from the checkpoint.

Score, as ``ImageReward.score``: BLIP's text encoder reads the prompt (padded to 35 tokens)
with cross-attention to the image tokens; its ``[CLS]`` feature goes through the linear
MLP head (768-1024-128-64-16-1, no activations) and is standardised::

    reward = (mlp(cls_feature) - 0.16717362830052426) / 1.0333394966054072

Range: unbounded, standardised (mean 0, std 1 over the authors' data; typically -2..2).
"""
from __future__ import annotations

import json
import re
from typing import Any

import torch
from PIL import Image
from torch import nn

from .base import Reward
from .clip_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resolve_file
from .registry import register_reward

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35


def _vision_key(key: str) -> str:
    """Map a BLIP ``visual_encoder`` key (timm-style ViT) to ``BlipVisionModel``'s naming."""
    key = re.sub(r"^blocks\.", "encoder.layers.", key)
    key = key.replace(".attn.proj.", ".self_attn.projection.").replace(".attn.qkv.", ".self_attn.qkv.")
    key = key.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
    key = re.sub(r"^norm\.", "post_layernorm.", key)
    key = key.replace("patch_embed.proj.", "embeddings.patch_embedding.")
    key = {"pos_embed": "embeddings.position_embedding", "cls_token": "embeddings.class_embedding"}.get(key, key)
    return key


def split_imagereward_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split an ``ImageReward.pt`` state dict into (vision, text, mlp) dicts with transformers names."""
    vision, text, mlp = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            vision[_vision_key(k[len("blip.visual_encoder."):])] = v
        elif k.startswith("blip.text_encoder."):
            name = k[len("blip.text_encoder."):]
            if not name.endswith("position_ids"):
                text[name] = v
        elif k.startswith("mlp."):
            mlp[k[len("mlp."):]] = v
    if not vision or not text or not mlp:
        raise ValueError("not an ImageReward checkpoint: expected blip.visual_encoder.*, blip.text_encoder.*, mlp.*")
    return vision, text, mlp


def vision_config_from_state_dict(vision: dict[str, torch.Tensor], num_heads: int | None = None) -> Any:
    """A ``BlipVisionConfig`` matching the checkpoint's ViT (BLIP's ViT: LayerNorm eps 1e-6, MLP ratio 4)."""
    from transformers import BlipVisionConfig

    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    n_pos = int(vision["embeddings.position_embedding"].shape[1]) - 1
    side = int(round(n_pos ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth, num_attention_heads=num_heads or max(1, width // 64),
        image_size=side * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu",
    )


def text_config_from_med(med: dict[str, Any], text: dict[str, torch.Tensor], encoder_width: int) -> Any:
    """A ``BlipTextConfig`` from BLIP's ``med_config.json`` (encoder width = the ViT's width, as BLIP sets it)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=int(text["embeddings.word_embeddings.weight"].shape[0]),
        hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, eos_token_id=None,
    )


class ImageRewardMLP(nn.Module):
    """ImageReward's head (module layout of the release so ``mlp.layers.*`` loads)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP vision + text encoders and the MLP head; ``forward`` returns standardised rewards ``[B]``."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: ImageRewardMLP):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's ``[CLS]`` feature with cross-attention to the image tokens."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raw = self.mlp(self.features(pixel_values, input_ids, attention_mask)).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_imagereward(checkpoint: str, med_config: str, device: torch.device | str = "cpu") -> ImageRewardModel:
    """Build the model from an ``ImageReward.pt`` file and ``med_config.json`` (strict key check)."""
    from transformers import BlipTextModel, BlipVisionModel

    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    vision_sd, text_sd, mlp_sd = split_imagereward_state_dict(sd)
    with open(med_config, encoding="utf-8") as f:
        med = json.load(f)
    vcfg = vision_config_from_state_dict(vision_sd)
    vision = BlipVisionModel(vcfg)
    vision.load_state_dict(vision_sd, strict=True)
    text = BlipTextModel(text_config_from_med(med, text_sd, vcfg.hidden_size), add_pooling_layer=False)
    missing, unexpected = text.load_state_dict(text_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"ImageReward text encoder: missing {missing}, unexpected {unexpected}")
    mlp = ImageRewardMLP(int(mlp_sd["layers.0.weight"].shape[1]))
    mlp.load_state_dict(mlp_sd, strict=True)
    model = ImageRewardModel(vision, text, mlp).to(device).eval()
    model.requires_grad_(False)
    return model


def load_blip_tokenizer(name_or_path: str) -> Any:
    """BERT tokenizer with BLIP's extra tokens (``[DEC]`` as bos, ``[ENC]``), as BLIP's ``init_tokenizer``."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(name_or_path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def imagereward_transform(size: int):
    """ImageReward's preprocessing: bicubic resize (short side), centre crop, OpenAI CLIP mean/std."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
        lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])


@register_reward("imagereward")
class ImageReward(Reward):
    """ImageReward preference score, standardised. Range: unbounded (typically -2..2)."""

    range = (float("-inf"), float("inf"))
    batch_size = 16

    def __init__(self, checkpoint: str = IMAGEREWARD_REPO, med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", device: str | torch.device = "cpu",
                 batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.checkpoint, self.med_config, self.tokenizer_id = checkpoint, med_config, tokenizer
        self._model = None

    def load(self) -> None:
        ckpt = resolve_file(self.checkpoint, "ImageReward.pt")
        med = resolve_file(self.med_config or self.checkpoint, "med_config.json") if (
            self.med_config or not self.checkpoint.endswith(".pt")) else None
        if med is None:
            raise ValueError("imagereward: pass med_config=... when checkpoint is a .pt file")
        self._tokenizer = load_blip_tokenizer(self.tokenizer_id)
        model = load_imagereward(ckpt, med, self.device)
        if len(self._tokenizer) > model.text.config.vocab_size:
            raise ValueError(f"imagereward: tokenizer has {len(self._tokenizer)} tokens, "
                             f"checkpoint only {model.text.config.vocab_size}")
        self._transform = imagereward_transform(model.vision.config.image_size)
        self._model = model

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        self.ensure_loaded()
        pix = torch.stack([self._transform(im) for im in images]).to(self.device)
        tok = self._tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        return self._model(pix, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).cpu()
