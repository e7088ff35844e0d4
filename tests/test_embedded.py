"""Loading of the embedded models: the one-zero-token context equals the stock 256-token padding."""
import math

import torch

from fpo_diffusion.embedded import tiny_model_path
from fpo_diffusion.policies import load_policy
from fpo_diffusion.policies.sd3 import fast_zero_tokens


def test_one_biased_zero_token_equals_n_zero_tokens_for_t5_less_sd3():
    path = str(tiny_model_path("sd3"))
    n = 16
    stock = load_policy("sd3", path, max_sequence_length=n)
    fast = load_policy("sd3", path, max_sequence_length=1)
    fast_zero_tokens(fast.pipeline, max_sequence_length=n)
    prompts = ["a red circle", "two blue squares"]
    c_stock, c_fast = stock.encode_prompts(prompts), fast.encode_prompts(prompts)
    assert c_stock["prompt_embeds"].shape[1] == c_fast["prompt_embeds"].shape[1] + n - 1
    shape = stock.latent_shape()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *shape, generator=g)
    t = torch.rand(2, 3, generator=g) * 0.9 + 0.05
    eps = torch.randn(2, 3, *shape, generator=g)
    with torch.no_grad():
        assert torch.allclose(stock.cfm_loss(x0, c_stock, t, eps), fast.cfm_loss(x0, c_fast, t, eps), atol=1e-5)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
        a = stock.sample(c_stock, gens(), steps=3, guidance_scale=3.0)
        b = fast.sample(c_fast, gens(), steps=3, guidance_scale=3.0)
    assert torch.allclose(a, b, atol=1e-4)
    assert not math.isnan(float(a.abs().sum()))


def test_loading_the_default_model_imports_only_the_shapes_plugin_hook():
    """The one-zero-token speed-up lives with the SD3 policy: loading ``embedded:shapes`` imports the
    shapes world's plug-in hook (found through its entry point) and nothing else of the world
    (least of all the pretraining module)."""
    import subprocess
    import sys

    code = ("import sys; from fpo_diffusion.embedded import load_model; p = load_model('sd3', 'embedded:shapes'); "
            "assert p.max_sequence_length == 1; "
            "print(sorted(m for m in sys.modules if m.startswith('fpo_diffusion.shapes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "['fpo_diffusion.shapes', 'fpo_diffusion.shapes.plugin']", out.stdout


def test_a_t5_less_sd3_policy_completes_its_pipeline_before_saving_and_other_families_need_nothing():
    from fpo_diffusion.embedded import load_model

    pol = load_model("sd3", "embedded:shapes")
    pol.pipeline.register_modules(text_encoder_3=None, tokenizer_3=None)  # a model trained without T5
    pol.complete_for_saving()  # what export --merge calls before save_pretrained
    assert pol.pipeline.text_encoder_3 is not None and pol.pipeline.tokenizer_3 is not None
    sd = load_model("sd", "embedded:tiny-sd")
    before = dict(sd.pipeline.components)
    sd.complete_for_saving()
    sd.set_distilled_guidance(7.0)  # no embedded guidance in SD: nothing changes
    assert dict(sd.pipeline.components) == before


def test_any_folder_with_a_null_t5_gets_the_one_token_context(tmp_path):
    """A copy of the shapes model (or a re-pretraining of it) samples through the same one-token path as
    ``embedded:shapes``: the policy sees the null T5, not the name. A T5-less folder and a real T5 keep the stock
    256 tokens."""
    import shutil

    from fpo_diffusion.embedded import load_model
    from fpo_diffusion.policies.sd3 import ZeroTokenBias, has_null_t5, null_t5
    from fpo_diffusion.shapes.plugin import DEFAULT_ASSET

    copy = tmp_path / "shapes_copy"
    shutil.copytree(DEFAULT_ASSET, copy)
    named, copied = load_model("sd3", "embedded:shapes"), load_model("sd3", str(copy))
    for policy in (named, copied):
        assert policy.max_sequence_length == 1 and has_null_t5(policy.pipeline)
        assert all(isinstance(p, ZeroTokenBias) for p in policy.pipeline.transformer.attn_processors.values())
    prompts = ["a photo of a red star left of a blue heart"]
    assert torch.equal(named.encode_prompts(prompts)["prompt_embeds"], copied.encode_prompts(prompts)["prompt_embeds"])
    # not a null T5: a T5 whose final norm is not zero, or no T5 at all
    t5, _ = null_t5(64)
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.fill_(1.0)
    assert not has_null_t5(type("P", (), {"text_encoder_3": t5, "transformer": copied.pipeline.transformer})())
    assert load_policy("sd3", str(tiny_model_path("sd3"))).max_sequence_length == 256
