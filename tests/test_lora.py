"""LoRA: trainable set, reference forward, diffusers-format export round trip, merge."""
from __future__ import annotations

import os

import pytest
import torch

from fpo_diffusion.lora import lora_state_dict, merge_lora
from fpo_diffusion.policies import POLICIES

from helpers_policies import PROMPTS, fresh_pipeline, generators, make_policy, policy_kwargs


def _probe(pol, seed=0):
    cond = pol.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, *pol.latent_shape(), generator=g)
    t = torch.tensor([[0.3], [0.7]])
    eps = torch.randn(2, 1, *x0.shape[1:], generator=g)
    return x0, cond, t, eps


def _pred(pol, x0, cond, t, eps):
    with torch.no_grad():
        return pol.cfm_loss(x0, cond, t, eps, return_pred=True)[1]


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_only_lora_trainable_and_reference_is_base(family):
    base = make_policy(family, lora=False)
    probe = _probe(base)
    base_pred = _pred(base, *probe)
    pol = make_policy(family, init=False)
    assert pol.trainable_parameters()
    assert all("lora_" in n for n, p in pol.denoiser.named_parameters() if p.requires_grad)
    for name in ("vae", "text_encoder"):
        assert not any(p.requires_grad for p in getattr(pol.pipeline, name).parameters())
    assert set(pol.lora_targets) == set(pol.default_lora_targets)
    adapted = _pred(pol, *probe)
    assert (adapted - base_pred).abs().max() > 1e-4  # random B: the adapter does something
    with pol.reference():
        torch.testing.assert_close(_pred(pol, *probe), base_pred)
    torch.testing.assert_close(_pred(pol, *probe), adapted)  # re-enabled afterwards
    # identity init: the adapted model starts as the base model
    ident = make_policy(family, init=True)
    torch.testing.assert_close(_pred(ident, *probe), base_pred)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_export_round_trip_into_stock_pipeline(family, tmp_path):
    pol = make_policy(family, init=False, rank=4)
    with torch.no_grad():  # make it look trained (and alpha != rank must survive via metadata)
        for p in pol.trainable_parameters():
            p.mul_(1.5)
    path = pol.export_lora(str(tmp_path / "lora"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and os.path.isfile(path)
    probe = _probe(pol)
    want = _pred(pol, *probe)
    cond = pol.encode_prompts(PROMPTS)
    want_x0 = pol.sample(cond, generators(2), steps=2, guidance_scale=1.0)

    stock = fresh_pipeline(family)
    stock.load_lora_weights(str(tmp_path / "lora"))
    loaded = POLICIES[family](stock, **policy_kwargs(family))
    torch.testing.assert_close(_pred(loaded, *probe), want, rtol=1e-5, atol=1e-5)
    got_x0 = loaded.sample(cond, generators(2), steps=2, guidance_scale=1.0)
    torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=1e-5)


def test_exported_metadata_lists_target_modules_in_sorted_order():
    from fpo_diffusion.lora import adapter_metadata

    class Unordered(frozenset):  # iterates in reverse order, as a set may under another PYTHONHASHSEED
        def __iter__(self):
            return iter(sorted(frozenset.__iter__(self), reverse=True))

    class Config:
        def to_dict(self):
            return {"r": 4, "target_modules": Unordered({"to_k", "to_q", "to_v"}), "lora_alpha": 8}

    meta = adapter_metadata(Config())
    assert meta == {"r": 4, "target_modules": ["to_k", "to_q", "to_v"], "lora_alpha": 8}
    assert list(meta) == ["r", "target_modules", "lora_alpha"]


def test_export_uses_given_state_dict(tmp_path):
    pol = make_policy("sd3", init=False)
    sd = lora_state_dict(pol.denoiser)
    zero = {k: torch.zeros_like(v) for k, v in sd.items()}
    pol.export_lora(str(tmp_path / "z"), state_dict=zero)
    stock = fresh_pipeline("sd3")
    stock.load_lora_weights(str(tmp_path / "z"))
    loaded = POLICIES["sd3"](stock, **policy_kwargs("sd3"))
    base = make_policy("sd3", lora=False)
    probe = _probe(base)
    torch.testing.assert_close(_pred(loaded, *probe), _pred(base, *probe))


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_merge_then_save_pretrained(tmp_path, family, monkeypatch):
    pol = make_policy(family, init=False)
    probe = _probe(pol)
    want = _pred(pol, *probe)
    pipe_cls = type(pol.pipeline)
    calls = []
    for name in ("fuse_lora", "unload_lora_weights"):  # diffusers' public LoRA API does the merge
        orig = getattr(pipe_cls, name)
        monkeypatch.setattr(pipe_cls, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    merge_lora(pol)
    assert calls == ["fuse_lora", "unload_lora_weights"]
    assert not any("lora_" in n for n, _ in pol.denoiser.named_parameters())
    assert not getattr(pol.denoiser, "peft_config", None) and not pol.denoiser._hf_peft_config_loaded
    torch.testing.assert_close(_pred(pol, *probe), want, rtol=0, atol=1e-6)
    pol.pipeline.save_pretrained(tmp_path / "merged")
    from fpo_diffusion.policies import load_policy

    again = load_policy("auto", str(tmp_path / "merged"), **policy_kwargs(family))
    torch.testing.assert_close(_pred(again, *probe), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA adapter to merge"):
        merge_lora(again)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_export_round_trip_through_diffusers_kohya_loader(family, tmp_path):
    from safetensors import safe_open

    from fpo_diffusion.lora import export_lora_kohya

    pol = POLICIES[family](fresh_pipeline(family), **policy_kwargs(family))
    torch.manual_seed(0)
    pol.add_lora(rank=4, alpha=8.0, init=False)  # scale alpha / rank = 2 must survive the layout
    path = export_lora_kohya(pol, tmp_path / "mine.safetensors")
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    n_modules = len(lora_state_dict(pol.denoiser)) // 2
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 3 * n_modules and alphas == {8.0}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    probe = _probe(pol)
    want = _pred(pol, *probe)
    cond = pol.encode_prompts(PROMPTS)
    want_x0 = pol.sample(cond, generators(2), steps=2, guidance_scale=1.0)
    stock = fresh_pipeline(family)
    stock.load_lora_weights(path)  # diffusers detects the kohya layout and converts it
    loaded = POLICIES[family](stock, **policy_kwargs(family))
    torch.testing.assert_close(_pred(loaded, *probe), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.sample(cond, generators(2), steps=2, guidance_scale=1.0), want_x0, rtol=0, atol=1e-6)


def test_kohya_export_refuses_transformer_families(tmp_path):
    from fpo_diffusion.lora import export_lora_kohya

    with pytest.raises(ValueError, match="kohya LoRA layout is for the UNet families .*diffusers format"):
        export_lora_kohya(make_policy("sd3"), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_add_lora_errors():
    pol = make_policy("sd", lora=False)
    with pytest.raises(ValueError, match="none of the LoRA target modules"):
        pol.add_lora(rank=2, target_modules=["no_such_proj"])
    pol.add_lora(rank=2, target_modules=["to_q"])
    assert pol.lora_targets == ["to_q"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        pol.add_lora(rank=2)
