"""Tiny, randomly initialised stock diffusers pipelines for tests and CPU demos.

Every family is built from its **stock** pipeline class and component classes with tiny
configs (a few thousand to ~2M parameters, 16x16 images, 8x8 latents), so loading,
sampling, LoRA and export code paths are the real ones. Nothing is downloaded: CLIP
tokenizers come from open_clip's bundled BPE vocabulary, FLUX's T5 tokenizer is a small
offline stand-in (:func:`fpo_diffusion.tokenizers.tiny_t5_tokenizer`).
"""
from __future__ import annotations

import torch

from .tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer, tiny_t5_tokenizer

TINY_IMAGE_SIZE = 16
"""Default image side of every tiny pipeline (latents are 8x8)."""
TINY_TEXT_LEN = 16
"""Context length of the tiny tokenizers/text encoders."""


def _clip_text(seed: int, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=TINY_TEXT_LEN,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
                         projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def _vae(seed: int, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=TINY_IMAGE_SIZE, **kw).eval()


def _vp_scheduler(cls_name: str, prediction_type: str):
    import diffusers

    extra = {"clip_sample": False, "set_alpha_to_one": False} if cls_name == "DDIMScheduler" else {}
    return getattr(diffusers, cls_name)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000, prediction_type=prediction_type,
                                        timestep_spacing="leading", steps_offset=1, **extra)


def _tiny_sd(seed: int, tok, prediction_type: str):
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return diffusers.StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text(seed + 2), tokenizer=tok, unet=unet.eval(),
        scheduler=_vp_scheduler("DDIMScheduler", prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def _tiny_sdxl(seed: int, tok, prediction_type: str):
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text(seed + 2), text_encoder_2=_clip_text(seed + 3, projection=32),
        tokenizer=tok, tokenizer_2=clip_tokenizer(TINY_TEXT_LEN), unet=unet.eval(),
        scheduler=_vp_scheduler("EulerDiscreteScheduler", prediction_type))


def _tiny_sd3(seed: int, tok, prediction_type: str):
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=16)
    return diffusers.StableDiffusion3Pipeline(
        transformer=tr.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                 shift_factor=0.0609),
        text_encoder=_clip_text(seed + 2, projection=32), tokenizer=tok,
        text_encoder_2=_clip_text(seed + 3, projection=32), tokenizer_2=clip_tokenizer(TINY_TEXT_LEN),
        text_encoder_3=None, tokenizer_3=None)


def _tiny_flux(seed: int, tok, prediction_type: str):
    import diffusers
    from transformers import T5Config, T5EncoderModel

    t5tok = tiny_t5_tokenizer(model_max_length=TINY_TEXT_LEN)
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0)).eval()
    torch.manual_seed(seed)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096)
    return diffusers.FluxPipeline(
        scheduler=sched, vae=_vae(seed + 1, use_quant_conv=False, use_post_quant_conv=False,
                                  scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text(seed + 2), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5tok,
        transformer=tr.eval())


TINY_BUILDERS = {"sd": _tiny_sd, "sdxl": _tiny_sdxl, "sd3": _tiny_sd3, "flux": _tiny_flux}
"""Model family -> its tiny pipeline's builder ``(seed, clip tokenizer, prediction_type)``: the registry of the tiny
models (``tests/test_add_an_algorithm.py`` checks it names every family of ``policies.POLICIES``)."""


def build_tiny_pipeline(family: str, seed: int = 0, *, prediction_type: str = "epsilon"):
    """A tiny stock pipeline of ``family`` (``sd``, ``sdxl``, ``sd3``, ``flux``), seeded.

    ``prediction_type`` (``epsilon`` / ``v_prediction``) applies to the VP families only.
    Images are 16x16; the VAE downsamples by 2.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(TINY_BUILDERS)}")
    if family in ("sd", "sdxl") and prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return TINY_BUILDERS[family](seed, clip_tokenizer(TINY_TEXT_LEN), prediction_type)
