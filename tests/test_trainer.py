"""The training loop: ranks, resume, export, the CLI's handling of bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion.advantages import group_advantages
from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")


def tiny_overrides(out, family="sd", **extra):
    o = {
        "output_dir": str(out), "model.family": family, "model.path": f"embedded:tiny-{family}",
        "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}", "train.iterations": 2,
        "sampling.steps": 3, "train.prompts_per_iteration": 3, "train.group_size": 2, "fpo.n_mc": 2,
        "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false", "train.minibatch_size": 6,
        "train.lr": 3e-3, "checkpoint.every": 1, "checkpoint.keep_last": 10,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run_train(args, nproc=1, check=True, cache=None):
    # One thread per process in both layouts: the thread count changes float reduction order.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if cache is not None:  # an empty model cache: the run builds its embedded tiny model itself
        env["FPO_DIFFUSION_CACHE"] = str(cache)
    if nproc == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_groups_span_ranks(tmp_path):
    # 3 prompts x 2 images = 6 samples; on 2 ranks the middle group is split 1 + 1 across ranks.
    # Same sampler batch (3) on both layouts, so each rollout chunk sees the same batch numerics.
    one = run_train(tiny_overrides(tmp_path / "one", **{"train.iterations": 1, "sampling.batch_size": 3}))
    # The two ranks start from an empty cache, whatever ran before: both build the tiny model (transformers writes
    # a text encoder's weights on rank 0 only once a process group exists; the build must come before it).
    two = run_train(tiny_overrides(tmp_path / "two", **{"train.iterations": 1, "sampling.batch_size": 3,
                                                        "train.minibatch_size": 3}), nproc=2, cache=tmp_path / "cache")
    s1, s2 = read_jsonl(tmp_path / "one" / "samples.jsonl"), read_jsonl(tmp_path / "two" / "samples.jsonl")
    assert len(s1) == len(s2) == 6
    for a, b in zip(s1, s2):
        assert a["prompt"] == b["prompt"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        # rewards agree to 1e-6 but the random tiny model's group stds are ~1e-3, so advantages to 1e-2
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-2)
    # the advantages are the group statistics of the *gathered* rewards
    r = torch.tensor([s["reward"] for s in s2], dtype=torch.float64)
    g = torch.tensor([s["prompt_index"] for s in s2])
    assert g[2] == g[3], "the middle group should span both ranks"
    assert torch.allclose(torch.tensor([s["advantage"] for s in s2], dtype=torch.float64), group_advantages(r, g), atol=1e-5)
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "checkpoint-000001" / "lora.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "checkpoint-000001" / "lora.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    moved = 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-4), k
        moved += int("lora_B" in k and w1[k].abs().max() > 0)
    assert moved > 0, "one update should move the zero-initialised LoRA B matrices"
    # the foreground share is a field of the rollout, gathered over ranks like the rewards
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl")[-1], read_jsonl(tmp_path / "two" / "metrics.jsonl")[-1]
    assert 0.0 <= m1["policy/foreground_share"] <= 1.0
    assert m1["policy/foreground_share"] == pytest.approx(m2["policy/foreground_share"], abs=1e-6)
    assert not any(k.startswith("reward/_") for k in m1)


def _trainer(out, family="sd", resume=None, **extra):
    from fpo_diffusion.trainer import Trainer

    return Trainer(load_config(None, tiny_overrides(out, family, **extra)), resume=resume)


def test_resume_is_bit_exact(tmp_path):
    extra = {"train.iterations": 4, "train.epochs": 2, "train.minibatch_size": 2, "train.lr_schedule": "cosine",
             "train.ema_decay": 0.9}
    _trainer(tmp_path / "full", **extra).train()
    _trainer(tmp_path / "split", **extra).train(stop_after=2)
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-000002").is_dir()
    assert not (tmp_path / "split" / "lora").exists()
    _trainer(tmp_path / "split", resume="latest", **extra).train()
    a = load_file(str(tmp_path / "full" / "checkpoints" / "checkpoint-000004" / "lora.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "checkpoint-000004" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = load_file(str(tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors"))
    eb = load_file(str(tmp_path / "split" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # launch/export_lora.py's logic re-creates the same (EMA) export from the checkpoint alone
    from fpo_diffusion.export import export_run

    export_run(tmp_path / "split", tmp_path / "exported", ema=True)
    ex = load_file(str(tmp_path / "exported" / "pytorch_lora_weights.safetensors"))
    assert ex.keys() == ea.keys() and all(torch.equal(ex[k], ea[k]) for k in ea)
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(tmp_path / "split", tmp_path / "exported")
    ma, mb = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [m["iteration"] for m in mb] == [0, 1, 2, 3]
    assert [m["reward/mean"] for m in ma] == [m["reward/mean"] for m in mb]


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_exported_lora_reproduces_the_trained_policy_in_a_stock_pipeline(tmp_path, family):
    import diffusers

    from fpo_diffusion.embedded import tiny_model_path

    tr = _trainer(tmp_path / "run", family, **{"train.iterations": 2, "train.lr": 3e-2})
    tr.train()
    pol = tr.policy
    with torch.no_grad():  # the trained LoRA must change what the model does
        cond = pol.encode_prompts(["a red circle"])
        x = torch.randn(1, *tr.latent_shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((1, 1), 0.5)
        e = torch.randn(1, 1, *tr.latent_shape, generator=torch.Generator().manual_seed(1))
        l_lora = pol.cfm_loss(x, cond, t, e)
        with pol.reference():
            l_base = pol.cfm_loss(x, cond, t, e)
    assert not torch.allclose(l_lora, l_base)
    gen = [torch.Generator().manual_seed(7)]
    with torch.no_grad():
        ours = pol.sample(cond, gen, steps=3, guidance_scale=1.0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tiny_model_path(family)),
                                                       **({"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}))
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt="a red circle", num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(7)).images
    assert torch.allclose(ours, stock, atol=1e-4, rtol=1e-3)
    if family == "sd":  # export_lora.py --format kohya: one kohya-ss file that diffusers' kohya loader reads back
        sys.path.insert(0, str(ROOT / "launch"))
        import export_lora

        assert export_lora.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "kohya"), "--format", "kohya"]) == 0
        (kfile,) = (tmp_path / "kohya").iterdir()
        assert kfile.name == "run.safetensors" and all(k.startswith("lora_unet_") for k in load_file(str(kfile)))
        kpipe = diffusers.DiffusionPipeline.from_pretrained(str(tiny_model_path(family)))
        kpipe.load_lora_weights(str(kfile))
        kpipe.set_progress_bar_config(disable=True)
        out = kpipe(prompt="a red circle", num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(7)).images
        assert torch.allclose(out, stock, atol=1e-6, rtol=0)
    if family == "sd3":  # the merged full pipeline (export_lora.py --merge) samples the same latents
        from fpo_diffusion.export import export_run

        export_run(tmp_path / "run", tmp_path / "merged", merge=True)
        merged = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))  # the stock call
        merged.set_progress_bar_config(disable=True)
        out = merged(prompt="a red circle", num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(7)).images
        assert torch.allclose(out, stock, atol=1e-4, rtol=1e-3)


@pytest.fixture
def cli(launch_script):
    return lambda argv: launch_script("train", argv)


def test_bad_input_gets_one_clear_line_and_nothing_is_overwritten(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    rc, err = cli(["--config", str(bad)])
    assert rc == 2 and len(err) == 1 and "not valid YAML" in err[0] and "bad.yaml" in err[0]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  learning_rate: 0.1\n")
    rc, err = cli(["--config", str(unknown)])
    assert rc == 2 and len(err) == 1 and "unknown config field train.learning_rate" in err[0]
    # a run that exists: neither a fresh start nor anything else may touch it
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')
    # (it has no checkpoint, so it starts over and keeps what it had in unfinished-1/: nothing is lost)
    rc, err = cli(tiny_overrides(out))
    assert rc == 0, err
    assert (out / "unfinished-1" / "config.yaml").read_text() == "precious: true\n"
    assert (out / "unfinished-1" / "metrics.jsonl").read_text() == '{"iteration": 0}\n'
    # now it holds a run with checkpoints: a fresh start is refused and touches nothing
    before = (out / "config.yaml").read_text()
    rc, err = cli(tiny_overrides(out))
    assert rc == 2 and len(err) == 1 and "already holds a run" in err[0]
    assert (out / "config.yaml").read_text() == before
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    rc, err = cli(["--resume", str(not_ckpt), *tiny_overrides(tmp_path / "fresh")])
    assert rc == 2 and len(err) == 1 and "is not a checkpoint" in err[0]
    rc, err = cli(["--resume", "latest", *tiny_overrides(tmp_path / "fresh2")])
    assert rc == 2 and len(err) == 1 and "no complete checkpoint" in err[0]
    rc, err = cli(tiny_overrides(tmp_path / "r3", **{"reward.weights": "{no_such_reward: 1.0}"}))
    assert rc == 2 and len(err) == 1 and "unknown reward 'no_such_reward'" in err[0]
    assert not (tmp_path / "r3" / "config.yaml").exists()
    rc, err = cli(tiny_overrides(tmp_path / "r4", **{"model.path": str(tmp_path / "nowhere")}))
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0]


def test_train_script_exit_code_on_bad_input(tmp_path):
    p = run_train(["train.nope=1"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["train: error: unknown config field train.nope (in override 'train.nope=1')"]


def test_bf16_autocast_gradient_checkpointing_kl_and_anchor_run(tmp_path):
    """The memory/speed knobs and both anchors run together and keep the update finite."""
    tr = _trainer(tmp_path / "run", "sd3", **{"train.iterations": 1, "train.mixed_precision": "bf16",
                                               "train.gradient_checkpointing": "true", "fpo.kl_beta": 0.1,
                                               "fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 2,
                                               "train.epochs": 2, "train.minibatch_size": 3})
    before = {n: p.detach().clone() for n, p in tr.policy.denoiser.named_parameters() if p.requires_grad}
    m = tr.train()
    assert m["fpo/skipped_updates"] == 0 and all(map(lambda v: v == v, [m["fpo/kl_ref"], m["fpo/fm_anchor_loss"]]))
    assert 0.5 < m["fpo/ratio_mean"] < 2.0
    after = dict(tr.policy.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("group_noise", [False, True])
def test_group_noise_shares_t_and_eps_within_a_group_only(tmp_path, group_noise):
    from fpo_diffusion.trainer import Trainer

    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"fpo.group_noise": str(group_noise).lower(),
                                                                 "train.group_size": 3, "fpo.kl_beta": 0}))
    tr = Trainer(cfg)
    ro = tr.rollout(0)
    prep = tr.algorithm.prepare(ro, 0)
    t, eps, groups = prep["t"], prep["eps"], ro.global_idx // 3
    assert t.shape == (9, 2) and len(set(groups.tolist())) == 3
    for i in range(9):
        for j in range(9):
            same = torch.equal(t[i], t[j]) and torch.equal(eps[i], eps[j])
            assert same == (i == j or (group_noise and groups[i] == groups[j])), (i, j)
    # on-policy, the ratio is 1 either way
    loss, stats = tr.algorithm.loss(ro, prep, torch.arange(9), torch.randn(9), iteration=0, epoch=0, step=0)
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and torch.isfinite(loss)


def test_sample_images_uses_fixed_noise_per_position(tmp_path):
    import numpy as np

    prompts = ["a red circle", "a blue square", "a red circle", "a green cross", "a blue square"]
    a = _trainer(tmp_path / "a", **{"sampling.batch_size": 2})
    b = _trainer(tmp_path / "b", **{"sampling.batch_size": 5})
    ia, ib = a.sample_images(prompts, seed=3), b.sample_images(prompts, seed=3)
    assert len(ia) == len(prompts) and all(im.size == ia[0].size for im in ia)
    px = [np.asarray(im, dtype=np.int16) for im in ia]
    # the same draw whatever the batching (at most 1/255 from batch-size-dependent kernels)
    assert all(np.abs(x - np.asarray(y, dtype=np.int16)).max() <= 1 for x, y in zip(px, ib))
    assert (px[0] != px[2]).any()  # same prompt, other position: another noise draw
    assert all((x == np.asarray(y, dtype=np.int16)).all() for x, y in zip(px, a.sample_images(prompts, seed=3)))
    assert any((x != np.asarray(y, dtype=np.int16)).any() for x, y in zip(px, a.sample_images(prompts, seed=4)))


def test_reference_samples_past_one_plan_and_kept_by_reward(tmp_path):
    """The anchor's base samples: past one iteration's share they come from the ``reference`` stream's next
    plans (the first share unchanged); with ``fm_anchor_min_reward`` only those the run's reward scores at
    least that high are kept, exactly the same latents as unfiltered; none kept is one clear error."""
    import math

    tr = _trainer(tmp_path / "run", "sd3", **{"fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 10})
    drv = tr.rollout_driver
    first = drv.reference_samples(None)  # iteration 0's share: 3 prompts x 2
    more = drv.reference_samples(10, reward=tr.reward, min_reward=-math.inf)
    assert len(first.x0) == 6 and len(more.x0) == 10 and more.rewards.shape == (10,)
    assert torch.equal(more.x0[:6], first.x0) and torch.equal(more.global_idx[:6], first.global_idx)
    assert len(set(more.global_idx.tolist())) == 10 and not torch.equal(more.x0[6:8], first.x0[:2])
    thr = float(more.rewards.median())
    kept = drv.reference_samples(10, reward=tr.reward, min_reward=thr)
    mask = more.rewards >= thr
    assert 0 < int(mask.sum()) < 10 and bool((kept.rewards >= thr).all())
    assert torch.equal(kept.x0, more.x0[mask]) and torch.equal(kept.global_idx, more.global_idx[mask])
    assert torch.equal(kept.cond["prompt_embeds"], more.cond["prompt_embeds"][mask])
    with pytest.raises(ValueError, match="none of the 10 base-model samples scores at least"):
        drv.reference_samples(10, reward=tr.reward, min_reward=float(more.rewards.max()) + 1)
    # the CFG scale they are drawn at: the run's by default, another on request
    gs = tr.cfg.sampling.guidance_scale
    assert gs > 1 and torch.equal(drv.reference_samples(None, guidance_scale=gs).x0, first.x0)
    assert not torch.allclose(drv.reference_samples(None, guidance_scale=1.0).x0, first.x0)
    # through the config: the algorithm's anchor holds only the kept samples
    tr2 = _trainer(tmp_path / "run2", "sd3", **{"fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 10,
                                                "fpo.fm_anchor_min_reward": thr})
    tr2.algorithm.setup()
    assert torch.equal(tr2.algorithm.anchor.x0, kept.x0)
    # by the task of the prompt (its metadata tag): only those tagged so, with or without the reward's threshold
    for i, item in enumerate(drv.prompts):
        item.metadata["tag"] = "odd" if i % 2 else "even"
    odd = torch.tensor([int(i) % 2 == 1 for i in more.prompt_idx])
    assert 0 < int(odd.sum()) < 10
    drawn, stock = [], drv.stock_sample
    drv.stock_sample = lambda cond, gens, *a, **k: (drawn.append(len(gens)), stock(cond, gens, *a, **k))[1]
    tagged = drv.reference_samples(10, tags=["odd"])
    drv.stock_sample = stock
    # the same draws as the unfiltered ones (each row's own generator); a smaller batch may round differently in
    # the last bits on some CPUs (1.9e-6 of values up to 3.8 seen), so equal up to float32 rounding
    assert torch.equal(tagged.global_idx, more.global_idx[odd]) and tagged.rewards is None
    torch.testing.assert_close(tagged.x0, more.x0[odd], rtol=0, atol=1e-4)
    assert sum(drawn) == int(odd.sum())  # only the tagged rows are drawn: the others cost nothing
    both = drv.reference_samples(10, reward=tr.reward, min_reward=thr, tags=["odd", "none"])
    assert torch.equal(both.global_idx, more.global_idx[odd & mask])
    torch.testing.assert_close(both.x0, more.x0[odd & mask], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="none of the 10 base-model samples has a prompt tagged position"):
        drv.reference_samples(10, tags=["position"])
    with pytest.raises(ConfigError, match=r"^fpo.fm_anchor_samples=10, fm_anchor_min_reward=.*: none of the 10 "
                                          r"base-model samples scores at least"):
        _trainer(tmp_path / "run4", "sd3", **{"fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 10,
                                              "fpo.fm_anchor_min_reward": float(more.rewards.max()) + 1})
    with pytest.raises(ConfigError, match=r"^fpo.fm_anchor_samples=10, .*fm_anchor_tags=\['nowhere'\]: none of "
                                          r"the 10 base-model samples has a prompt tagged nowhere"):
        _trainer(tmp_path / "run5", "sd3", **{"fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 10,
                                              "fpo.fm_anchor_tags": "[nowhere]"})
    with pytest.raises(ConfigError, match=r"^fpo.fm_anchor_tags must be a non-empty list"):
        load_config(None, ["fpo.fm_anchor_tags=[]"])
    tr3 = _trainer(tmp_path / "run3", "sd3", **{"fpo.fm_anchor_beta": 0.1, "fpo.fm_anchor_samples": 10,
                                                "fpo.fm_anchor_guidance_scale": 1.0})
    assert torch.equal(tr3.algorithm.anchor.x0, drv.reference_samples(10, guidance_scale=1.0).x0)
