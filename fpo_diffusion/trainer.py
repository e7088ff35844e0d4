"""The training loop (DESIGN.md, "One FPO iteration"), shared by FPO and the baselines.

rollout (stock pipeline, any sampler) -> reward -> gather -> group advantages ->
old CFM losses at fixed ``(t, eps)`` -> E epochs of clipped FPO updates.

Everything random in an iteration is drawn from generators seeded by
``(seed, iteration, global sample index)``, so a run is bit-for-bit repeatable on CPU,
independent of how samples are spread over ranks, and a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, faults
from .advantages import group_advantages, zero_variance_share
from .checkpoint import (CheckpointError, install_lora_only_hooks, load_extra, read_state, resolve_resume,
                         save_checkpoint)
from .config import Config, ConfigError, config_to_dict, save_config
from .images import foreground_share, make_grid, to_pil
from .noise import sample_generator
from .policies.base import Cond, cond_cat, cond_index, cond_to
from .prompts import PromptItem, iteration_plan, load_prompts, rank_slice
from .tracking import RunLogger


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""


#: Why an update was skipped (index 0: it was not). A non-finite reward skips the whole iteration's
#: update; a non-finite loss, FPO ratio or gradient norm skips one optimizer step. Either way nothing
#: non-finite reaches the weights, the optimizer state, the EMA or a checkpoint, each skip is printed
#: with its iteration and counted in the metrics (``nonfinite/<cause>``), and
#: ``train.max_nonfinite_in_a_row`` skips in a row stop the run with :class:`TrainingError`.
_CAUSES = ("", "gradient", "loss", "ratio", "reward")


@dataclass
class Rollout:
    """One iteration's samples on this rank."""

    global_idx: torch.Tensor  # [n] global sample index
    prompt_idx: torch.Tensor  # [n] prompt index (the group id)
    cond: Cond  # [n, ...]
    x0: torch.Tensor  # [n, *L]
    rewards: torch.Tensor  # [n]
    components: dict[str, torch.Tensor]  # name -> [n]
    images: list = field(default_factory=list)  # a few PIL images for the grid
    seconds: float = 0.0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample data of the algorithm's sampler


def _quiet_libraries() -> None:
    """Silence the libraries' own progress bars and deprecation chatter (our tqdm shows progress)."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _no_accelerator() -> bool:
    """True on a CPU-only machine: accelerate then runs multi-process launches as gloo CPU ranks
    (without ``cpu=True`` every rank of ``accelerate launch --multi_gpu`` would think it is alone)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def adamw(params, **kw) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has one (one kernel for all LoRA tensors instead of a
    Python loop over hundreds of small ones), else the multi-tensor ``foreach`` path."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw)


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class FPOTrainer:
    """Builds everything from a :class:`Config` and runs :meth:`train`."""

    def __init__(self, cfg: Config, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        _quiet_libraries()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=_no_accelerator())
        acc = self.accelerator
        self.resume_from = self._check_output_dir(resume)
        set_seed(cfg.train.seed)

        # Model + LoRA
        from .embedded import load_model

        self.policy = load_model(cfg.model.family, cfg.model.path, dtype=cfg.model.dtype, device=acc.device)
        set_seed(cfg.train.seed)  # LoRA init must not depend on what loading consumed of the RNG
        from .lora import prepare_for_training

        params = prepare_for_training(self.policy, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                      rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                      target_modules=cfg.lora.target_modules, dropout=cfg.lora.dropout)
        if not params:
            raise ConfigError("the LoRA adapter has no trainable parameters: check lora.target_modules")

        # Optimisation
        t = cfg.train
        self.optimizer = adamw(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                weight_decay=t.weight_decay)
        self.world = acc.num_processes
        self.n_local = (t.prompts_per_iteration * t.group_size) // self.world
        rank_slice(t.prompts_per_iteration * t.group_size, acc.process_index, self.world)  # validates divisibility
        n_mb = math.ceil(self.n_local / t.minibatch_size)
        self.steps_per_iteration = t.epochs * math.ceil(n_mb / t.grad_accum_steps)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(t.lr_schedule, self.optimizer, num_warmup_steps=t.warmup_steps,
                                          num_training_steps=t.iterations * self.steps_per_iteration)
        install_lora_only_hooks(acc)
        self.model, self.optimizer = acc.prepare(self.policy.denoiser, self.optimizer)
        # Stepped once per optimizer step by us (a prepared scheduler steps once per process).
        acc.register_for_checkpointing(self.lr_scheduler)
        self.ema = [p.detach().clone() for p in params] if t.ema_decay else None

        # Rewards, prompts
        from rewards.multi import MultiReward

        self.reward = MultiReward(cfg.reward.weights, cfg.reward.options, device=acc.device,
                                  nonfinite="keep")  # NaN/Inf rewards skip the update (train_iteration)
        self.prompts: list[PromptItem] = load_prompts(cfg.prompts)
        self._cond_cache: dict[str, Cond] = {}
        self.negative_cond = self._encode([cfg.sampling.negative_prompt]) if cfg.sampling.guidance_scale > 1 else None
        self.latent_shape = tuple(self.policy.latent_shape(cfg.sampling.height, cfg.sampling.width))
        from .algorithms import build_algorithm

        self.algorithm = build_algorithm(cfg.algorithm, self)

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.logger = RunLogger(self.out, enabled=acc.is_main_process, tensorboard=cfg.log.tensorboard,
                                wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, config=config_to_dict(cfg))
        self.start_iteration = 0
        self.nonfinite_in_a_row = 0
        self.cfm_start: float | None = None
        if self.resume_from is not None:
            self._load(self.resume_from)
        elif acc.is_main_process:  # only now that everything loaded: a failed start leaves no run behind
            save_config(cfg, self.out / "config.yaml")
        acc.wait_for_everyone()
        self.algorithm.setup()

    # ------------------------------------------------------------------ setup helpers
    def _check_output_dir(self, resume: str | None) -> Path | None:
        acc = self.accelerator
        cfg_file = self.out / "config.yaml"
        if resume is None:
            if cfg_file.exists():
                raise ConfigError(f"output directory {self.out} already holds a run; resume it with --resume latest "
                                  f"or choose another output_dir")
            return None
        path = resolve_resume(resume, self.ckpt_root)
        saved = read_state(path).get("config")
        if saved is not None:
            now = config_to_dict(self.cfg)
            for section in ("train", "log", "checkpoint"):
                for k in ("iterations",) if section == "train" else list(now[section]):
                    saved.get(section, {}).pop(k, None)
                    now[section].pop(k, None)
            if saved != now:
                diff = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict)
                              for k in now[s] if saved.get(s, {}).get(k) != now[s][k])
                raise ConfigError(f"the config differs from the checkpoint's in {', '.join(diff) or 'top-level fields'}; "
                                  f"resume with the run's own config ({cfg_file})")
        return path

    def _load(self, path: Path) -> None:
        state = read_state(path)
        self.accelerator.load_state(str(path))
        self.start_iteration = int(state["iteration"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.cfm_start = state.get("cfm_start")
        ema = load_extra(path, "ema.safetensors")
        if self.ema is not None and ema is not None:
            for i, e in enumerate(self.ema):
                e.copy_(ema[str(i)])
        self.logger.truncate_after(self.start_iteration)
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at iteration {self.start_iteration}", flush=True)

    def _encode(self, prompts: list[str]) -> Cond:
        """Text conditions, computed once per distinct prompt and cached on CPU."""
        # One prompt per call: an embedding must not depend on which prompts share its batch
        # (batch-size-dependent kernels would make runs differ with the number of ranks).
        for p in sorted({p for p in prompts if p not in self._cond_cache}):
            self._cond_cache[p] = cond_to(self.policy.encode_prompts([p]), "cpu")
        return cond_to(cond_cat([self._cond_cache[p] for p in prompts]), self.accelerator.device)

    def _autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, iteration: int, *, use_reference: bool = False, n_samples: int | None = None,
                seed_offset: int = 0) -> Rollout:
        """Sample this rank's share of the iteration, decode, and score it (scoring overlaps sampling)."""
        cfg, acc = self.cfg, self.accelerator
        plan = iteration_plan(len(self.prompts), iteration, prompts_per_iteration=cfg.train.prompts_per_iteration,
                              group_size=cfg.train.group_size, seed=cfg.train.seed + seed_offset)
        sl = rank_slice(len(plan), acc.process_index, self.world)
        global_idx = torch.arange(len(plan))[sl]
        prompt_idx = plan[sl]
        if n_samples is not None:
            global_idx, prompt_idx = global_idx[:n_samples], prompt_idx[:n_samples]
        items = [self.prompts[i] for i in prompt_idx.tolist()]
        cond = self._encode([it.prompt for it in items])
        s = cfg.sampling
        x0s, futures, grid_images, extras = [], [], [], {}
        t0 = time.perf_counter()
        ref = self.policy.reference() if use_reference else contextlib.nullcontext()
        bar = tqdm(list(_chunks(len(items), s.batch_size)), desc=f"rollout {iteration}", leave=False,
                   disable=not (cfg.log.progress and acc.is_local_main_process))
        with ref:
            for chunk in bar:
                gens = [sample_generator(cfg.train.seed + seed_offset, iteration, int(g), stream=0)
                        for g in global_idx[chunk]]
                neg = self.negative_batch(len(gens))
                with self._autocast():
                    if use_reference:  # the frozen base model through the stock pipeline
                        x0, ext = self.stock_sample(cond_index(cond, chunk), gens, neg), {}
                    else:
                        x0, ext = self.algorithm.sample(cond_index(cond, chunk), gens, neg, iteration)
                x0 = x0.float()
                faults.hit("rollout")
                x0s.append(x0)
                for k, v in ext.items():
                    extras.setdefault(k, []).append(v)
                if use_reference:
                    continue
                pil = to_pil(self.policy.decode(x0))
                if len(grid_images) < cfg.log.grid_images:
                    grid_images.extend(pil[: cfg.log.grid_images - len(grid_images)])
                chunk_items = items[chunk]
                futures.append((self.reward.submit(pil, [it.prompt for it in chunk_items],
                                                   [it.metadata for it in chunk_items]), pil))
        x0 = torch.cat(x0s)
        extras = {k: torch.cat(v) for k, v in extras.items()}
        if use_reference:
            return Rollout(global_idx, prompt_idx, cond, x0, torch.zeros(len(x0)), {}, [], time.perf_counter() - t0)
        rewards, comps, fg = [], {}, []
        for fut, pil in futures:
            total, parts = fut.result()
            rewards.append(total)
            for k, v in parts.items():
                comps.setdefault(k, []).append(v)
            fg.append(foreground_share(pil) * len(pil))
        comps = {k: torch.cat(v) for k, v in comps.items()}
        comps["_foreground_share"] = torch.full((len(x0),), sum(fg) / len(x0))
        return Rollout(global_idx, prompt_idx, cond, x0, torch.cat(rewards), comps, grid_images,
                       time.perf_counter() - t0, extras)

    def negative_batch(self, n: int) -> Cond | None:
        """The negative-prompt condition repeated for ``n`` rows (``None`` without CFG)."""
        if self.negative_cond is None:
            return None
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.negative_cond.items()}

    def stock_sample(self, cond: Cond, generators: list[torch.Generator], negative_cond: Cond | None, *,
                     model=None) -> torch.Tensor:
        """Final latents from the stock pipeline with the config's ``sampling`` settings (``model``:
        the denoiser to run, ``None`` for the policy's own, e.g. inside ``policy.reference()``)."""
        s = self.cfg.sampling
        return self.policy.sample(cond, generators, steps=s.steps, guidance_scale=s.guidance_scale,
                                  scheduler=s.scheduler, height=s.height, width=s.width, negative_cond=negative_cond,
                                  model=model)

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int) -> list:
        """PIL images of the current policy for ``prompts`` through the stock pipeline (deterministic
        sampler, the config's ``sampling`` settings), image ``i`` from ``sample_generator(seed, 0, i)``.

        The noise depends only on ``seed`` and the position, so two policies (say before and after
        training) are compared on the same draws. For evaluations; training rollouts use ``rollout``.
        """
        cond = self._encode(prompts)
        images = []
        for chunk in _chunks(len(prompts), self.cfg.sampling.batch_size):
            gens = [sample_generator(seed, 0, i, stream=0) for i in range(chunk.start, chunk.stop)]
            with self._autocast():
                x0 = self.stock_sample(cond_index(cond, chunk), gens, self.negative_batch(len(gens)), model=self.model)
            images.extend(to_pil(self.policy.decode(x0.float())))
        return images

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t.to(self.accelerator.device).contiguous()).cpu()

    # ------------------------------------------------------------------ update
    def update(self, ro: Rollout, adv: torch.Tensor, prep: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
        """E epochs of shuffled minibatches of the algorithm's loss, with accumulation and clipping."""
        cfg, acc = self.cfg, self.accelerator
        tr = cfg.train
        dev = acc.device
        adv = adv.to(dev)
        sums: dict[str, float] = {}
        n_terms = 0
        skipped = 0
        nonfinite = dict.fromkeys(_CAUSES[1:], 0)
        grad_norms = []
        self.model.train()
        for epoch in range(tr.epochs):
            g = sample_generator(tr.seed, iteration, acc.process_index * 1009 + epoch, stream=3)
            perm = torch.randperm(self.n_local, generator=g)
            mbs = [perm[s] for s in _chunks(self.n_local, tr.minibatch_size)]
            groups = [mbs[i:i + tr.grad_accum_steps] for i in range(0, len(mbs), tr.grad_accum_steps)]
            for step, group in enumerate(groups):
                cause = 0  # index into _CAUSES; the worst over the accumulated minibatches and the ranks wins
                for j, idx in enumerate(group):
                    sync = j == len(group) - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                    idx_d = idx.to(dev)
                    with ctx:
                        loss, stats = self.algorithm.loss(ro, prep, idx_d, adv[idx_d], iteration=iteration,
                                                          epoch=epoch, step=step * tr.grad_accum_steps + j)
                        if not bool(torch.isfinite(loss.detach())):
                            bad_ratio = any("ratio" in k and not math.isfinite(float(v)) for k, v in stats.items())
                            cause = max(cause, _CAUSES.index("ratio" if bad_ratio else "loss"))
                        acc.backward(loss / len(group))
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    sums["surrogate"] = sums.get("surrogate", 0.0) + float(loss.detach())
                    n_terms += 1
                gn = acc.clip_grad_norm_(self.model.parameters(), tr.max_grad_norm if tr.max_grad_norm else float("inf"))
                gn = float(gn) if gn is not None else float("nan")
                if cause == 0 and not math.isfinite(gn):
                    cause = _CAUSES.index("gradient")
                cause = int(self._gather(torch.tensor([float(cause)], device=dev)).max())
                if cause == 0:
                    self.optimizer.step()
                    faults.hit("update")
                    self.lr_scheduler.step()
                    self._ema_step()
                    self.nonfinite_in_a_row = 0
                    grad_norms.append(gn)
                else:  # nothing of this step reaches the weights, the optimizer state, the LR schedule or the EMA
                    skipped += 1
                    nonfinite[_CAUSES[cause]] += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self._skip(iteration, _CAUSES[cause])
                self.optimizer.zero_grad(set_to_none=True)
        name = self.algorithm.name
        out = {f"{name}/{k}": v / max(n_terms, 1) for k, v in sums.items()}
        out[f"{name}/skipped_updates"] = skipped
        out.update({f"nonfinite/{k}": v for k, v in nonfinite.items()})
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        out["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        return out

    def _skip(self, iteration: int, cause: str, detail: str = "") -> None:
        """Count an update skipped for a non-finite ``cause`` (printed with the iteration); stop with
        :class:`TrainingError` after ``train.max_nonfinite_in_a_row`` skipped updates in a row."""
        self.nonfinite_in_a_row += 1
        if self.accelerator.is_main_process:
            print(f"iteration {iteration}: skipped an update with a non-finite {cause}{detail}", flush=True)
        limit = self.cfg.train.max_nonfinite_in_a_row
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(f"{self.nonfinite_in_a_row} updates in a row were skipped for non-finite numbers "
                                f"(train.max_nonfinite_in_a_row={limit}; the last: a non-finite {cause} at "
                                f"iteration {iteration}); stopping")

    @torch.no_grad()
    def _ema_step(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        for e, p in zip(self.ema, self.policy.trainable_parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights into the LoRA parameters (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.policy.trainable_parameters()
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    # ------------------------------------------------------------------ the loop
    def train_iteration(self, it: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        from rewards.base import RewardError

        try:
            ro = self.rollout(it)
        except RewardError as e:  # e.g. a remote reward still down after its retries: one line, not a traceback
            raise TrainingError(f"iteration {it}: {' '.join(str(e).split())}") from e
        all_rewards = self._gather(ro.rewards)
        all_groups = self._gather(ro.prompt_idx)
        a = cfg.advantage
        adv_all = group_advantages(all_rewards, all_groups, std=a.std, clip=a.clip, eps=a.eps)
        sl = rank_slice(len(all_rewards), acc.process_index, self.world)
        adv = adv_all[sl]
        bad = ~torch.isfinite(all_rewards)
        if bad.any():  # the whole iteration's update is skipped (rewards are gathered: every rank agrees)
            names = [k for k, v in sorted(ro.components.items())
                     if not k.startswith("_") and not torch.isfinite(self._gather(v)).all()]
            self._log_samples(it, all_groups, all_rewards, adv_all)
            self._skip(it, "reward", f" from {', '.join(map(repr, names)) or 'the reward'} "
                                     f"({int(bad.sum())} of {len(bad)} samples)")
            return {"reward/mean": float("nan"), "reward/nonfinite_samples": int(bad.sum()),
                    f"{self.algorithm.name}/skipped_updates": self.steps_per_iteration,
                    **{f"nonfinite/{c}": int(c == "reward") for c in _CAUSES[1:]},
                    "train/lr": self.lr_scheduler.get_last_lr()[0]}
        t_u = time.perf_counter()
        prep = self.algorithm.prepare(ro, it)
        own_cfm = float(self._gather(self.algorithm.own_cfm_loss(ro, prep, it).reshape(1)).mean())
        if self.cfm_start is None and math.isfinite(own_cfm):  # never a non-finite reference in a checkpoint
            self.cfm_start = own_cfm
        stats = self.update(ro, adv, prep, it)
        upd_s = time.perf_counter() - t_u
        comps = {k: float(self._gather(v).mean()) for k, v in sorted(ro.components.items())}
        n_global = len(all_rewards)
        m = {
            "reward/mean": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std(unbiased=False)),
            "reward/zero_variance_groups": zero_variance_share(all_rewards, all_groups),
            "advantage/mean": float(adv_all.mean()),
            "advantage/abs_mean": float(adv_all.abs().mean()),
            "advantage/max": float(adv_all.max()),
            "advantage/min": float(adv_all.min()),
            "policy/cfm_loss_own_samples": own_cfm,
            "policy/cfm_loss_ratio_to_start": own_cfm / self.cfm_start if self.cfm_start else float("nan"),
            "perf/rollout_samples_per_s": n_global / max(ro.seconds, 1e-9),
            "perf/update_samples_per_s": n_global / max(upd_s, 1e-9),
            "perf/rollout_s": ro.seconds,
            "perf/update_s": upd_s,
            **{("policy/foreground_share" if k == "_foreground_share" else f"reward/{k}"): v for k, v in comps.items()},
            **stats,
        }
        r = cfg.log.collapse_ratio
        if self.cfm_start and not (self.cfm_start / r <= own_cfm <= self.cfm_start * r) and acc.is_main_process:
            print(f"warning: iteration {it}: the policy's CFM loss on its own samples is {own_cfm:.4g}, "
                  f"{own_cfm / self.cfm_start:.2f}x its start ({self.cfm_start:.4g}): possible collapse or reward "
                  f"hacking; look at the image grids (raise fpo.kl_beta or fpo.fm_anchor_beta)", flush=True)
        self._log_samples(it, all_groups, all_rewards, adv_all)
        if cfg.log.image_every and (it % cfg.log.image_every == 0 or it == cfg.train.iterations - 1) and ro.images:
            caps = [f"{float(r):.2f} | {self.prompts[int(p)].prompt}" for p, r in zip(ro.prompt_idx, ro.rewards)]
            self.logger.log_image("samples", make_grid(ro.images, caps[: len(ro.images)]), it)
        return m

    def _log_samples(self, it: int, groups: torch.Tensor, rewards: torch.Tensor, adv: torch.Tensor) -> None:
        """One row per global sample in ``samples.jsonl``: what was asked, what it scored, its advantage
        (and the prompt's GenEval ``tag`` when its metadata has one, for per-task training curves)."""
        if not self.accelerator.is_main_process:
            return
        import json

        with (self.out / "samples.jsonl").open("a") as f:
            for i, (g, r, a) in enumerate(zip(groups.tolist(), rewards.tolist(), adv.tolist())):
                item = self.prompts[g]
                row = {"iteration": it, "index": i, "prompt_index": g, "prompt": item.prompt, "reward": r, "advantage": a}
                if item.metadata.get("tag"):
                    row["tag"] = item.metadata["tag"]
                f.write(json.dumps(row) + "\n")

    def _save(self, iteration: int) -> Path:
        state = {"iteration": iteration, "nonfinite_in_a_row": self.nonfinite_in_a_row, "cfm_start": self.cfm_start,
                 "world_size": self.world, "version": __version__, "config": config_to_dict(self.cfg)}
        extra = {"ema.safetensors": {str(i): e for i, e in enumerate(self.ema)}} if self.ema is not None else None
        return save_checkpoint(self.accelerator, self.ckpt_root, iteration, state, extra,
                               keep_last=self.cfg.checkpoint.keep_last)

    def export(self, out_dir: str | Path | None = None) -> Path:
        """Export the (EMA) LoRA in the diffusers format; main process only writes."""
        out_dir = Path(out_dir or self.out / "lora")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with self.ema_weights():
                self.policy.export_lora(str(out_dir))
        self.accelerator.wait_for_everyone()
        return out_dir

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.iterations``; with ``stop_after`` stop (checkpointed) after that many iterations."""
        cfg, acc = self.cfg, self.accelerator
        last: dict[str, float] = {}
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.start_iteration + stop_after)
        iters = range(self.start_iteration, end)
        bar = tqdm(iters, desc="FPO", initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (cfg.log.progress and acc.is_local_main_process))
        try:
            for it in bar:
                last = self.train_iteration(it)
                self.logger.log(last, it)
                bar.set_postfix(reward=f"{last['reward/mean']:.3f}", ratio=f"{last.get('fpo/ratio_mean', 1):.3f}",
                                clip=f"{last.get('fpo/clip_frac', 0):.2f}")
                done = it + 1
                every = cfg.checkpoint.every
                if (every and done % every == 0) or done == end:
                    self._save(done)
            if end == cfg.train.iterations:
                self.export()
        finally:
            self.logger.close()
        return last


def run(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> dict[str, float]:
    """Build a trainer for ``cfg`` and train it."""
    return FPOTrainer(cfg, resume=resume).train(stop_after=stop_after)


__all__ = ["FPOTrainer", "TrainingError", "CheckpointError", "run"]
