"""Configs (YAML + dotted overrides), advantages, the k-repeat plan and the noise draws."""
import torch
import pytest

from fpo_diffusion.advantages import group_advantages, zero_variance_share
from fpo_diffusion.config import Config, ConfigError
from fpo_diffusion.config_io import config_to_dict, load_config, save_config
from fpo_diffusion.noise import TimeSampling, draw_tau_eps, sample_t
from fpo_diffusion.prompts import iteration_plan, rank_slice


def test_yaml_and_overrides_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  iterations: 7\nreward:\n  weights: {pickscore: 0.5, jpeg_compressibility: 0.5}\n")
    cfg = load_config(f, ["fpo.beta=2.5", "fpo.time_sampling.kind=logit_normal", "sampling.scheduler=unipc"])
    assert cfg.train.lr == 3e-4 and cfg.train.iterations == 7 and cfg.fpo.beta == 2.5
    assert cfg.fpo.time_sampling.kind == "logit_normal" and cfg.sampling.scheduler == "unipc"
    assert cfg.reward.weights == {"pickscore": 0.5, "jpeg_compressibility": 0.5}
    save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config(tmp_path / "saved.yaml")) == config_to_dict(cfg)


@pytest.mark.parametrize("text,needle", [
    ("train:\n  lr: [1, 2\n", "not valid YAML at line"),
    ("train:\n  learning_rate: 1\n", "unknown config field train.learning_rate"),
    ("- a\n- b\n", "mapping at the top level"),
    ("train:\n  iterations: many\n", "train.iterations: expected an integer"),
    ("fpo:\n  ratio_mode: geometric\n", "ratio_mode"),
    ("advantage:\n  std: batch\n", "advantage.std"),
])
def test_bad_config_files_get_one_clear_error(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(f)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unknown config field train.foo"):
        load_config(None, ["train.foo=1"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config("missing.yaml")


def test_group_advantages_exact():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 7, 7, 7])
    a = group_advantages(r, g, std="group", eps=0.0 + 1e-4)
    std0 = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    assert torch.allclose(a[:3], torch.tensor([-1.0, 0.0, 1.0]) / (std0 + 1e-4))
    assert torch.equal(a[3:], torch.zeros(3))  # a flat group carries no signal
    assert zero_variance_share(r, g) == 0.5
    ag = group_advantages(r, g, std="global")
    assert torch.allclose(ag[:3], torch.tensor([-1.0, 0.0, 1.0]) / (r.std(unbiased=False) + 1e-4))
    big = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4, dtype=torch.long), clip=1.0)
    assert big.max() == 1.0 and big.min() == pytest.approx(-1 / 3**0.5, rel=1e-3)  # 1.73 clipped, -0.58 kept


def test_group_advantages_do_not_depend_on_order():
    r = torch.randn(24, generator=torch.Generator().manual_seed(0))
    g = torch.arange(6).repeat_interleave(4)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(group_advantages(r, g)[perm], group_advantages(r[perm], g[perm]))


def test_iteration_plan_is_a_deterministic_k_repeat_spread_over_ranks():
    plan = iteration_plan(50, 3, prompts_per_iteration=6, group_size=4, seed=1)
    assert torch.equal(plan, iteration_plan(50, 3, prompts_per_iteration=6, group_size=4, seed=1))
    assert not torch.equal(plan, iteration_plan(50, 4, prompts_per_iteration=6, group_size=4, seed=1))
    assert len(plan) == 24 and len(set(plan.tolist())) == 6
    assert all((plan[i * 4:(i + 1) * 4] == plan[i * 4]).all() for i in range(6))
    parts = [plan[rank_slice(24, r, 3)] for r in range(3)]
    assert torch.equal(torch.cat(parts), plan)
    with pytest.raises(ConfigError, match="do not divide over 5 ranks"):
        rank_slice(24, 0, 5)


def test_time_sampling_never_hits_zero_weight_and_pairs_are_reproducible():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal", "grid"):
        cfg = TimeSampling(kind=kind, t_min=0.05, t_max=0.95)
        t = sample_t(20000, cfg, g)
        assert t.min() >= 0.05 and t.max() <= 0.95
    grid = sample_t(5000, TimeSampling(kind="grid", grid_size=5), g)
    assert len(torch.unique(grid)) == 5
    t1, e1 = draw_tau_eps((4, 2, 2), 3, TimeSampling(), seed=0, iteration=2, sample_indices=[5, 9])
    t2, e2 = draw_tau_eps((4, 2, 2), 3, TimeSampling(), seed=0, iteration=2, sample_indices=[9])
    assert t1.shape == (2, 3) and e1.shape == (2, 3, 4, 2, 2)
    assert torch.equal(t1[1:], t2) and torch.equal(e1[1:], e2)  # independent of which rank draws it
    with pytest.raises(ValueError):
        TimeSampling(t_min=0.0)


def test_stratified_times_put_one_draw_in_each_quantile_stratum():
    n = 8
    uni = TimeSampling(stratified=True)
    ln = TimeSampling(kind="logit_normal", stratified=True, t_min=1e-4, t_max=1 - 1e-4)
    ts_u, ts_l = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        t = sample_t(n, uni, g)
        u = (t - uni.t_min) / (uni.t_max - uni.t_min)  # back to [0, 1) quantiles
        assert torch.equal(torch.floor(u * n).long(), torch.arange(n))
        ts_u.append(t)
        t = sample_t(n, ln, g)
        q = 0.5 * (1 + torch.erf(torch.logit(t.double()) / 2**0.5))  # the logit-normal CDF
        assert torch.equal(torch.floor(q * n).clamp(max=n - 1).long(), torch.arange(n))
        ts_l.append(t)
    # the marginal density is unchanged: uniform mean / logit-normal median and spread
    tu, tl = torch.cat(ts_u), torch.cat(ts_l)
    assert abs(tu.mean().item() - 0.5) < 0.01 and abs(tu.var().item() - 0.96**2 / 12) < 0.005
    assert abs(tl.median().item() - 0.5) < 0.01 and abs(torch.logit(tl).std().item() - 1.0) < 0.02
    # the default (unstratified) draw is the plain one, bit for bit
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_t(n, TimeSampling(), a), 0.02 + 0.96 * torch.rand(n, generator=b))


def test_overrides_with_url_reward_names():
    """Issue 16.6: a reward name holding a URL is one key, unquoted or quoted, in weights and in options."""
    url = "remote:http://127.0.0.1:8765"
    cfg = load_config(None, [f"reward.weights.{url}=1.0", f"reward.options.{url}.timeout=3"])
    assert cfg.reward.weights == {"shapes": 1.0, url: 1.0}  # a dotted override adds to the mapping
    assert cfg.reward.options[url] == {"timeout": 3} and cfg.reward.options["shapes"] == {"mode": "strict"}
    cfg = load_config(None, [f'reward.weights={{"{url}": 1.0}}', f'reward.options."{url}".timeout=3'])
    assert cfg.reward.weights == {url: 1.0} and cfg.reward.options == {url: {"timeout": 3}}
    cfg = load_config(None, [f'reward.weights."{url}"=0.5', "reward.options.remote.url=http://10.0.0.1:80"])
    assert cfg.reward.weights[url] == 0.5 and cfg.reward.options["remote"] == {"url": "http://10.0.0.1:80"}
    cfg = load_config(None, ['output_dir="runs/a=b"'])  # '=' inside a quoted value stays in the value
    assert cfg.output_dir == "runs/a=b"
    with pytest.raises(ConfigError, match="unclosed quote"):
        load_config(None, ['reward.weights."remote:http://x=1'])
    with pytest.raises(ConfigError, match="unknown config field train.lr.x"):
        load_config(None, ["train.lr.x=1"])


def test_negative_scale_shrinks_only_the_negative_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    full = group_advantages(r, g)
    half = group_advantages(r, g, negative_scale=0.5)
    assert torch.equal(half[full >= 0], full[full >= 0])
    assert torch.allclose(half[full < 0], 0.5 * full[full < 0])
    assert (group_advantages(r, g, negative_scale=0.0) >= 0).all()
    assert torch.equal(group_advantages(r, g, negative_scale=1.0), full)
    with pytest.raises(ConfigError, match=r"advantage.negative_scale must be in \[0, 1\]"):
        load_config(None, ["advantage.negative_scale=1.5"])


def test_each_setting_has_one_definition():
    """The config's sections extend the pure settings they configure: one field, one default, one range."""
    import dataclasses

    from fpo_diffusion.beta_control import BetaController
    from fpo_diffusion.config import BetaAutoConfig, DDPOConfig, FlowGRPOConfig, FPOConfig, StepwiseConfig
    from fpo_diffusion.fpo import FPOObjective, FPOSurrogate

    assert issubclass(FPOConfig, FPOSurrogate) and issubclass(FPOObjective, FPOSurrogate)
    assert FPOConfig().objective() == FPOObjective()  # the default run's objective is the objective's defaults
    assert issubclass(BetaAutoConfig, BetaController) and BetaAutoConfig().controller() == BetaController()
    assert issubclass(FlowGRPOConfig, StepwiseConfig) and issubclass(DDPOConfig, StepwiseConfig)
    shared = {f.name for f in dataclasses.fields(StepwiseConfig)}
    assert shared == {"clip_range", "timestep_fraction", "kl_beta"}
    for cls in (FlowGRPOConfig, DDPOConfig):  # what is left of each is its own
        assert not shared & {n for n in vars(cls).get("__annotations__", {}) if n not in ("section", "timestep_fraction")}
