"""Built-in rewards: real loading code on tiny models saved to disk, formulas by hand, OCR on real weights."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards.base import RewardError
from rewards.registry import available_rewards, build_reward

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def noise_image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


IMAGES = [noise_image(0), noise_image(1), Image.new("RGB", (40, 56), (200, 30, 30))]
PROMPTS = ["a photo of a cat", "a red dog", "a photo of a dog"]


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def linear_chain(x: torch.Tensor, sd: dict[str, torch.Tensor], idx: list[int]) -> torch.Tensor:
    """Hand computation of an activation-free MLP head: x W_i^T + b_i in sequence."""
    for i in idx:
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x


def test_registry_lists_builtins_and_rejects_unknown():
    names = set(available_rewards())
    assert {"pickscore", "hps", "imagereward", "aesthetic", "clipscore", "jpeg_compressibility",
            "jpeg_incompressibility", "ocr", "remote"} <= names
    with pytest.raises(KeyError, match="unknown reward 'nope'; available: .*pickscore"):
        build_reward("nope")


# ----------------------------------------------------------------------------- JPEG


def test_jpeg_rewards_exact():
    img = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    kb = len(buf.getvalue()) / 1000
    inc = build_reward("jpeg_incompressibility")([img, img], ["x", "y"])
    com = build_reward("jpeg_compressibility")([img], ["x"])
    assert inc.dtype == torch.float32 and inc.tolist() == [np.float32(kb)] * 2
    assert com.item() == np.float32(-kb)
    # a flat image compresses better than noise
    flat = Image.new("RGB", (64, 64), (10, 200, 30))
    assert build_reward("jpeg_compressibility")([flat], [""]).item() > com.item()


# ----------------------------------------------------------------------------- OCR


def render_text(text: str, size: tuple[int, int] = (560, 140)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 30), text, fill="black", font=ImageFont.load_default(size=64))
    return img


def test_ocr_formula_matches_flow_grpo():
    from rewards.ocr import levenshtein, ocr_reward, target_text

    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_reward("Hello World", "hello world") == 1.0
    assert ocr_reward("xx HELLOWORLD yy", "Hello World") == 1.0           # substring -> 0 distance
    assert ocr_reward("helo world", "Hello World") == pytest.approx(1 - 1 / 10)
    assert ocr_reward("", "Hello") == 0.0
    assert ocr_reward("completely unrelated long text", "abc") == 0.0      # distance capped at len
    assert target_text('a sign saying "Open Late" at night', {}) == "Open Late"
    assert target_text("no quotes", {"text": "Hi"}) == "Hi"
    with pytest.raises(RewardError, match="no double-quoted text"):
        target_text("no quotes here", {})


def test_ocr_real_weights_prefers_the_quoted_text():
    reward = build_reward("ocr")
    prompt = 'a shop sign that says "Hello World"'
    scores = reward([render_text("Hello World"), render_text("Goodbye Moon")], [prompt, prompt])
    assert scores[0].item() == 1.0
    assert scores[1].item() < scores[0].item()
    assert 0.0 <= scores[1].item() < 1.0


# ----------------------------------------------------------------------------- tiny CLIP (transformers)


def tiny_hf_clip(tmp_path, logit_scale: float = math.log(50.0)):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from fpo_diffusion.tokenizers import clip_tokenizer_files

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=logit_scale)
    model = CLIPModel(cfg).eval()
    tok_dir = clip_tokenizer_files(tmp_path / "tok")
    vocab, merges = str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77))
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "proc")
    return model, proc


def hf_embeddings(model, proc, images, prompts):
    """Hand computation: towers -> projections -> L2 normalisation."""
    pix = proc(images=images, return_tensors="pt")["pixel_values"]
    tok = proc(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                     attention_mask=tok["attention_mask"]).pooler_output)
    return l2n(img), l2n(txt)


def test_pickscore_loads_saved_model_and_applies_logit_scale(tmp_path):
    model, proc = tiny_hf_clip(tmp_path)
    reward = build_reward("pickscore", model=str(tmp_path / "clip"), processor=str(tmp_path / "proc"))
    got = reward(IMAGES, PROMPTS)
    img, txt = hf_embeddings(model, proc, IMAGES, PROMPTS)
    want = 50.0 * (img * txt).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scaled = build_reward("pickscore", model=str(tmp_path / "clip"), processor=str(tmp_path / "proc"), scale=1 / 26)
    torch.testing.assert_close(scaled(IMAGES, PROMPTS), want / 26, rtol=1e-5, atol=1e-5)


def test_pickscore_formula_on_fixed_embeddings(tmp_path, monkeypatch):
    import rewards.pickscore as ps

    tiny_hf_clip(tmp_path)
    img = l2n(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    txt = l2n(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    monkeypatch.setattr(ps, "hf_clip_features", lambda *a, **k: (img, txt))
    reward = build_reward("pickscore", model=str(tmp_path / "clip"), processor=str(tmp_path / "proc"))
    got = reward(IMAGES[:2], PROMPTS[:2])
    torch.testing.assert_close(got, torch.tensor([50 * 1 / math.sqrt(2), 50 * 0.8]), rtol=1e-5, atol=1e-5)


def test_aesthetic_head_on_normalised_clip_embedding(tmp_path):
    from rewards.aesthetic import AESTHETIC_FILE, AestheticMLP

    model, proc = tiny_hf_clip(tmp_path)
    torch.manual_seed(1)
    mlp = AestheticMLP(16)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sd = mlp.state_dict()
    assert sorted(sd) == sorted(f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias"))
    torch.save(sd, tmp_path / AESTHETIC_FILE)
    reward = build_reward("aesthetic", clip_model=str(tmp_path / "clip"), processor=str(tmp_path / "proc"),
                          head=str(tmp_path / AESTHETIC_FILE))
    got = reward(IMAGES, PROMPTS)
    img, _ = hf_embeddings(model, proc, IMAGES, PROMPTS)
    want = linear_chain(img, sd, [0, 2, 4, 6, 7]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.std() > 0  # images are told apart


# ----------------------------------------------------------------------------- tiny open_clip


TINY_OPEN_CLIP = {"model_cfg": {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


def tiny_open_clip(folder, with_weights: bool):
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(2)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # differ from any fresh random init
    if with_weights:
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model, open_clip.get_tokenizer(f"local-dir:{folder}")


def open_clip_embeddings(model, tokenizer, images, prompts, hps: bool):
    """HPSv2 resizes the tensor (ToTensor first); open_clip's own eval transform resizes the PIL image."""
    from torchvision import transforms as T

    resize = [T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)]
    steps = [T.ToTensor(), *resize] if hps else [*resize, T.ToTensor()]
    tf = T.Compose([*steps, T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(im.convert("RGB")) for im in images]))
        txt = model.encode_text(tokenizer(prompts))
    return l2n(img), l2n(txt)


def test_hps_loads_hps_checkpoint_over_open_clip(tmp_path):
    from rewards.hps import HPS_CHECKPOINTS

    model, tokenizer = tiny_open_clip(tmp_path / "arch", with_weights=False)
    ckpt = tmp_path / "hps" / HPS_CHECKPOINTS["v2.1"]
    ckpt.parent.mkdir()
    # the released files are {"state_dict": ...}, saved from a DDP-wrapped model in some versions
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, ckpt)
    reward = build_reward("hps", version="v2.1", checkpoint=str(tmp_path / "hps"),
                          model_name=f"local-dir:{tmp_path / 'arch'}")
    got = reward(IMAGES, PROMPTS)
    img, txt = open_clip_embeddings(model, tokenizer, IMAGES, PROMPTS, hps=True)
    torch.testing.assert_close(got, (img * txt).sum(-1), rtol=1e-4, atol=1e-5)
    assert all(-1 <= s <= 1 for s in got.tolist())
    x100 = build_reward("hps", checkpoint=str(ckpt), model_name=f"local-dir:{tmp_path / 'arch'}", scale=100)
    torch.testing.assert_close(x100(IMAGES, PROMPTS), 100 * got, rtol=1e-4, atol=1e-3)


def test_clipscore_open_clip_local_dir(tmp_path):
    model, tokenizer = tiny_open_clip(tmp_path / "oc", with_weights=True)
    reward = build_reward("clipscore", model_name=f"local-dir:{tmp_path / 'oc'}")
    got = reward(IMAGES, PROMPTS)
    img, txt = open_clip_embeddings(model, tokenizer, IMAGES, PROMPTS, hps=False)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(got, 2.5 * cos.clamp_min(0), rtol=1e-4, atol=1e-5)
    raw = build_reward("clipscore", model_name=f"local-dir:{tmp_path / 'oc'}", scale=1.0, clamp=False)
    torch.testing.assert_close(raw(IMAGES, PROMPTS), cos, rtol=1e-4, atol=1e-5)


def test_clip_tokenizer_files_match_open_clip():
    import open_clip
    from transformers import CLIPTokenizer

    from fpo_diffusion.tokenizers import clip_tokenizer_files

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        root = clip_tokenizer_files(d)
        tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
        text = "a photo of two red circles, left of a Yellow triangle!"
        ids = tok(text)["input_ids"]
        ref = open_clip.get_tokenizer("ViT-B-32")([text])[0]
        assert ids == ref[: len(ids)].tolist() and len(tok) == 49408


# ----------------------------------------------------------------------------- ImageReward (BLIP)


def to_original_blip_vision_key(k: str) -> str:
    """transformers BlipVisionModel name -> BLIP/ImageReward ``visual_encoder`` name (timm ViT)."""
    k = k.replace("embeddings.class_embedding", "cls_token").replace("embeddings.position_embedding", "pos_embed")
    k = k.replace("embeddings.patch_embedding.", "patch_embed.proj.").replace("encoder.layers.", "blocks.")
    k = k.replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj.")
    k = k.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
    return k.replace("post_layernorm.", "norm.")


def tiny_imagereward(tmp_path):
    """An ImageReward release in miniature: ImageReward.pt (original key names), med_config.json, BERT vocab."""
    from transformers import BlipTextModel, BlipVisionModel

    from rewards.imagereward import ImageRewardMLP, load_blip_tokenizer, text_config_from_med

    (tmp_path / "bert").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red"]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = load_blip_tokenizer(str(tmp_path / "bert"))
    torch.manual_seed(3)
    from transformers import BlipVisionConfig
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=16,
                                              layer_norm_eps=1e-6)).eval()
    med = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "vocab_size": len(tok),
           "encoder_width": 768, "add_cross_attention": True, "model_type": "bert", "type_vocab_size": 2}
    fake_text_sd = {"embeddings.word_embeddings.weight": torch.zeros(len(tok), 32)}
    text = BlipTextModel(text_config_from_med(med, fake_text_sd, 64), add_pooling_layer=False).eval()
    with torch.no_grad():  # make cross-attention to the image matter (the default init is tiny)
        for name, p in text.named_parameters():
            if "crossattention.self" in name or "crossattention.output.dense" in name:
                p.normal_(std=0.5)
    mlp = ImageRewardMLP(32)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sd = {f"blip.visual_encoder.{to_original_blip_vision_key(k)}": v for k, v in vision.state_dict().items()}
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    sd.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    sd["blip.vision_proj.weight"] = torch.zeros(4, 64)  # other BLIP heads in the release are ignored
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in sd and "blip.visual_encoder.norm.weight" in sd
    (tmp_path / "ir").mkdir()
    torch.save(sd, tmp_path / "ir" / "ImageReward.pt")
    (tmp_path / "ir" / "med_config.json").write_text(json.dumps(med))
    return vision, text, mlp, tok


def test_imagereward_release_format_onto_transformers_blip(tmp_path):
    from rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, imagereward_transform

    vision, text, mlp, tok = tiny_imagereward(tmp_path)
    reward = build_reward("imagereward", checkpoint=str(tmp_path / "ir"), tokenizer=str(tmp_path / "bert"))
    got = reward(IMAGES, PROMPTS)

    tf = imagereward_transform(32)
    pix = torch.stack([tf(im) for im in IMAGES])
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"][0, 0].item() == tok.cls_token_id
    with torch.no_grad():
        emb = vision(pixel_values=pix).last_hidden_state
        feat = text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
                    encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        raw = linear_chain(feat, mlp.state_dict(), [0, 2, 4, 6, 7]).squeeze(-1)
    torch.testing.assert_close(got, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, rtol=1e-4, atol=1e-5)
    # the image matters (cross-attention is live): same prompt, different images
    same = reward([IMAGES[0], IMAGES[2]], [PROMPTS[0]] * 2)
    assert abs(same[0].item() - same[1].item()) > 1e-4


def test_imagereward_rejects_foreign_checkpoint(tmp_path):
    torch.save({"layers.0.weight": torch.zeros(1, 1)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text("{}")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    reward = build_reward("imagereward", checkpoint=str(tmp_path), tokenizer=str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        reward(IMAGES[:1], PROMPTS[:1])
