"""The training loop (docs/architecture.md, "One iteration"), shared by every algorithm.

rollout (``rollout.py``) -> reward -> gather -> group advantages (``advantages.py``) -> the
algorithm's ``prepare`` -> update (``update.py``) -> log (``tracking.py``) / checkpoint
(``run_state.py``) -> export (``export.py``). The loop builds these pieces from a :class:`Config`
and passes data between them; it holds no algorithm, sampling or checkpoint logic of its own.

Everything random in an iteration is drawn from generators seeded by
``(seed, iteration, global sample index)`` (``noise.STREAMS``), so a run is bit-for-bit
repeatable on CPU, independent of how samples are spread over ranks, and a resumed run
continues exactly.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .advantages import group_advantages, zero_variance_share
from .algorithms import AlgorithmContext, build_algorithm
from .budget import check_image_size, check_iteration_memory, rollout_size_warning
from .checkpoint import CheckpointError, install_lora_only_hooks
from .cli import quiet_libraries
from .config import Config, ConfigError
from .config_io import config_for_writing, record_config, save_config
from .distributed import collective_timeout, cpu_fallback_note, deepspeed_on_cpu, no_accelerator
from .export import export_trained_lora
from .images import group_rows, labelled_grid
from .noise import SeedStreams
from .prompts import PromptItem, check_metadata, load_prompts, rank_slice
from .rollout import Rollout, RolloutDriver
from .run_lock import RunLock
from .run_state import EMA, Progress, check_resume, load_run, save_run, set_aside_unfinished, unfinished_start
from .tracking import RunLogger, progress_line, where_line
from .update import CAUSES, NonfiniteGuard, TrainingError, Updater, adamw


class Trainer:
    """Builds everything from a :class:`Config` and runs :meth:`train`, for any ``cfg.algorithm``."""

    def __init__(self, cfg: Config, resume: str | None = None):
        from accelerate import Accelerator

        quiet_libraries()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        cpu = no_accelerator() and not deepspeed_on_cpu()
        # An embedded tiny model is built into the cache before any process group exists: once one does,
        # transformers writes a text encoder's weights on rank 0 only, and rank 1 could publish a copy without them.
        from .embedded import check_model

        check_model(cfg.model.family, cfg.model.path)
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu,
                                       kwargs_handlers=[collective_timeout(cfg.train.collective_timeout_s)])
        if (note := cpu_fallback_note(cpu)) and self.accelerator.is_main_process:
            print(note, flush=True)  # a DeepSpeed / FSDP launch config that becomes a plain run says so
        # One writer per run folder: the main process holds its lock until the run ends (released by the
        # kernel however the process ends); a second process is refused with one line.
        self.lock = RunLock(self.out).acquire() if self.accelerator.is_main_process else None
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (the loop does this when :meth:`train` ends)."""
        if self.lock is not None:
            self.lock.release()

    def _setup(self, resume: str | None) -> None:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        # Settings accepted but meaningless: refused (a contradiction) or one line each, before anything loads.
        # (model.family against model.path was checked in __init__, before the process group started)
        from .config_io import config_warnings

        if acc.is_main_process:
            for line in config_warnings(cfg):
                print(line, flush=True)
            if (line := rollout_size_warning(cfg, acc.num_processes)):
                print(line, flush=True)
        # Prompts against the rewards, before the model loads: a prompt a reward cannot score (an unknown class
        # or tag, "count": "three") is one line naming its file and line, not a reward of 0 after a rollout.
        from rewards.multi import MultiReward

        from .periodic_eval import eval_items

        self.reward = MultiReward(cfg.reward.weights, cfg.reward.options, device=acc.device,
                                  nonfinite="keep")  # NaN/Inf rewards skip the update (train_iteration)
        self.prompts: list[PromptItem] = load_prompts(cfg.prompts)
        check_metadata(self.prompts, self.reward.check_metadata, "prompts.source")
        eval_prompts = eval_items(cfg.eval) if cfg.eval.every else None
        if eval_prompts is not None:
            check_metadata(eval_prompts, self.reward.check_metadata, "eval.prompts")
        # A folder whose run stopped before its first checkpoint is started over (its files set aside).
        unfinished = resume in (None, "latest") and unfinished_start(self.out)
        acc.wait_for_everyone()
        self.resume_from = None if unfinished else check_resume(cfg, self.out, resume, world_size=acc.num_processes,
                                                                distributed_type=str(acc.distributed_type))
        set_seed(cfg.train.seed)

        # Model + LoRA
        from .embedded import load_model

        self.policy = load_model(cfg.model.family, cfg.model.path, dtype=cfg.model.dtype, device=acc.device,
                                 distilled_guidance=cfg.sampling.distilled_guidance)
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
        from .distributed import configure_deepspeed

        for note in configure_deepspeed(acc, t):  # DeepSpeed takes its micro-batch from the config: no dataloader
            if acc.is_main_process:
                print(note, flush=True)
        self.model, self.optimizer = acc.prepare(self.policy.denoiser, self.optimizer)
        # Stepped once per optimizer step by us (a prepared scheduler steps once per process).
        acc.register_for_checkpointing(self.lr_scheduler)
        self.ema = EMA(params, t.ema_decay, warmup=t.ema_warmup, every=t.ema_update_every) if t.ema_decay else None
        self.guard = NonfiniteGuard(t.max_nonfinite_in_a_row, verbose=acc.is_main_process)
        self.updater = Updater(t, acc, self.model, self.optimizer, self.lr_scheduler, n_local=self.n_local,
                               guard=self.guard, ema=self.ema)

        # Sampling (the rewards and prompts are built above)
        self.rollout_driver = RolloutDriver(cfg, self.policy, self.prompts, rank=acc.process_index, world=self.world,
                                            device=acc.device, autocast=acc.autocast,
                                            progress=False)  # one bar, the iterations' (no nested per-rollout bar)
        from .periodic_eval import PeriodicEval

        eval_reward = self.reward if not cfg.eval.reward_options else MultiReward(
            cfg.reward.weights, cfg.eval_reward_options(), device=acc.device, nonfinite="keep")
        self.periodic_eval = PeriodicEval(cfg.eval, cfg.train.iterations, driver=self.rollout_driver,
                                          reward=eval_reward, accelerator=acc, items=eval_prompts) if cfg.eval.every else None
        check_image_size(cfg.sampling.height, cfg.sampling.width, self.policy)
        self.latent_shape = tuple(self.policy.latent_shape(cfg.sampling.height, cfg.sampling.width))
        one_cond = self.rollout_driver.conditions([self.prompts[0].prompt])
        check_iteration_memory(cfg, math.prod(self.latent_shape),
                               sum(v.numel() * v.element_size() for v in one_cond.values()),
                               (cfg.sampling.height or self.policy.height) * (cfg.sampling.width or self.policy.width),
                               self.world)
        self.algorithm = build_algorithm(cfg.algorithm, AlgorithmContext(
            **AlgorithmContext.settings_of(cfg), policy=self.policy, model=self.model, device=acc.device,
            autocast=acc.autocast, latent_shape=self.latent_shape, negative_cond=self.rollout_driver.negative_cond,
            seeds=SeedStreams(t.seed), stock_sample=self.rollout_driver.stock_sample,
            reference_samples=functools.partial(self.rollout_driver.reference_samples, model=self.model,
                                                reward=self.reward),
            rank_mean=lambda x: acc.reduce(x, reduction="mean")))
        if self.algorithm.state_dict():  # e.g. fpo.beta: auto, DiffusionNFT's old policy: in every checkpoint
            acc.register_for_checkpointing(self.algorithm)

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if unfinished:  # nothing is lost: the earlier attempt's files move into a folder of their own
                kept = set_aside_unfinished(self.out)
                print(f"note: {self.out} held a run that stopped before its first checkpoint; its files are kept in "
                      f"{kept}; starting the run over" + (" (there was nothing to resume)" if resume else ""),
                      flush=True)
        acc.wait_for_everyone()
        self.logger = RunLogger(self.out, enabled=acc.is_main_process, tensorboard=cfg.log.tensorboard,
                                wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, config=config_for_writing(cfg))
        self.progress = Progress()
        if self.resume_from is not None:
            self.progress = load_run(acc, self.resume_from, self.ema)
            self.guard.in_a_row = self.progress.nonfinite_in_a_row
            self.guard.iterations_in_a_row = self.progress.nonfinite_iterations_in_a_row
            self.logger.truncate_after(self.progress.iteration)
            if acc.is_main_process:
                print(f"resumed from {self.resume_from} at iteration {self.progress.iteration}", flush=True)
                record_config(cfg, self.out / "config.yaml")  # e.g. more iterations (--allow-change)
        elif acc.is_main_process:  # only now that everything loaded: a failed start leaves no run behind
            save_config(cfg, self.out / "config.yaml")
        self.start_iteration = self.progress.iteration
        acc.wait_for_everyone()
        self.algorithm.setup()

    @property
    def nonfinite_in_a_row(self) -> int:
        """Updates skipped in a row for non-finite numbers (see ``update.py``)."""
        return self.guard.in_a_row

    # ------------------------------------------------------------------ sampling
    def rollout(self, iteration: int) -> Rollout:
        """This rank's share of ``iteration`` from the algorithm's sampler, decoded and scored."""
        return self.rollout_driver.rollout(iteration, self.algorithm.sample, self.reward)

    def sample_images(self, prompts: list[str], seed: int) -> list:
        """PIL images of the current policy for ``prompts`` (fixed noise per ``seed`` and position; see
        :meth:`RolloutDriver.images <fpo_diffusion.rollout.RolloutDriver.images>`)."""
        return self.rollout_driver.images(prompts, seed, model=self.model)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t.to(self.accelerator.device).contiguous()).cpu()

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
        adv_all = group_advantages(all_rewards, all_groups, std=a.std, clip=a.clip, eps=a.eps,
                                   negative_scale=a.negative_scale)
        sl = rank_slice(len(all_rewards), acc.process_index, self.world)
        adv = adv_all[sl]
        bad = ~torch.isfinite(all_rewards)
        if bad.any():  # the whole iteration's update is skipped (rewards are gathered: every rank agrees)
            names = [k for k, v in sorted(ro.components.items()) if not torch.isfinite(self._gather(v)).all()]
            self._log_samples(it, all_groups, all_rewards, adv_all)
            self.guard.skip(it, "reward", f" from {', '.join(map(repr, names)) or 'the reward'} "
                                     f"({int(bad.sum())} of {len(bad)} samples)")
            self.guard.end_iteration(it)
            return {"reward/mean": float("nan"), "reward/nonfinite_samples": int(bad.sum()),
                    f"{self.algorithm.name}/skipped_updates": self.steps_per_iteration,
                    **{f"nonfinite/{c}": int(c == "reward") for c in CAUSES[1:]},
                    "train/lr": self.lr_scheduler.get_last_lr()[0]}
        t_u = time.perf_counter()
        prep = self.algorithm.prepare(ro, it)
        own_cfm = float(self._gather(self.algorithm.own_cfm_loss(ro, prep, it).reshape(1)).mean())
        cfm_start = self.progress.cfm_start
        if cfm_start is None and math.isfinite(own_cfm):  # never a non-finite reference in a checkpoint
            cfm_start = self.progress.cfm_start = own_cfm
        upd = self.updater.update(self.algorithm, ro, adv, prep, it)
        own = {**upd.algorithm, **self.algorithm.end_iteration(it, upd.algorithm)}
        stats = {**{f"{self.algorithm.name}/{k}": v for k, v in own.items()}, **upd.loop}
        self.guard.end_iteration(it)  # iterations that skip updates count too, not only steps in a row
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
            "policy/cfm_loss_ratio_to_start": own_cfm / cfm_start if cfm_start else float("nan"),
            "perf/rollout_samples_per_s": n_global / max(ro.seconds, 1e-9),
            "perf/update_samples_per_s": n_global / max(upd_s, 1e-9),
            "perf/rollout_s": ro.seconds,
            "perf/update_s": upd_s,
            **({"policy/foreground_share": float(self._gather(ro.foreground_share).mean())}
               if ro.foreground_share is not None else {}),
            **{f"reward/{k}": v for k, v in comps.items()},
            **stats,
        }
        r = cfg.log.collapse_ratio
        if cfm_start and not (cfm_start / r <= own_cfm <= cfm_start * r) and acc.is_main_process:
            print(f"warning: iteration {it}: the policy's CFM loss on its own samples is {own_cfm:.4g}, "
                  f"{own_cfm / cfm_start:.2f}x its start ({cfm_start:.4g}): possible collapse or reward "
                  f"hacking; look at the image grids (raise fpo.kl_beta or fpo.fm_anchor_beta)", flush=True)
        self._log_samples(it, all_groups, all_rewards, adv_all)
        if cfg.log.image_every and (it % cfg.log.image_every == 0 or it == cfg.train.iterations - 1) and ro.images:
            self.logger.log_image("samples", self._samples_grid(ro, it), it)
        return m

    def _samples_grid(self, ro: Rollout, it: int):
        """The logged training grid: a row per prompt (its group's first samples), the reward on each tile."""
        pos = ro.image_index or list(range(len(ro.images)))
        keys = [int(ro.prompt_idx[i]) for i in pos]
        rows = group_rows(keys)
        t = self.cfg.train
        return labelled_grid([[ro.images[j] for j in r] for r in rows], [self.prompts[keys[r[0]]].prompt for r in rows],
                             [[f"{float(ro.rewards[pos[j]]):.2f}" for j in r] for r in rows],
                             title=f"iteration {it}: {len(rows)} of {t.prompts_per_iteration} prompts x "
                                   f"{t.group_size} samples (rank {self.accelerator.process_index}), reward on each")

    def _evaluate(self, it: int) -> dict[str, float]:
        """The periodic evaluation after iteration ``it`` (``eval.*``), its grid logged; ``eval/*`` metrics."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            metrics, grid = self.periodic_eval.run(self.model, it)
        if grid is not None:
            self.logger.log_image("eval", grid, it)
        return metrics

    def _log_samples(self, it: int, groups: torch.Tensor, rewards: torch.Tensor, adv: torch.Tensor) -> None:
        """One row per global sample in ``samples.jsonl``: what was asked, what it scored, its advantage
        (and the prompt's GenEval ``tag`` when its metadata has one, for per-task training curves)."""
        rows = []
        for i, (g, r, a) in enumerate(zip(groups.tolist(), rewards.tolist(), adv.tolist())):
            item = self.prompts[g]
            row = {"iteration": it, "index": i, "prompt_index": g, "prompt": item.prompt, "reward": r, "advantage": a}
            if item.metadata.get("tag"):
                row["tag"] = item.metadata["tag"]
            rows.append(row)
        self.logger.log_samples(rows)

    def _save(self, iteration: int) -> Path:
        self.progress.iteration = iteration
        self.progress.nonfinite_in_a_row = self.guard.in_a_row
        self.progress.nonfinite_iterations_in_a_row = self.guard.iterations_in_a_row
        return save_run(self.accelerator, self.ckpt_root, self.progress, self.cfg, self.ema)

    def export(self, out_dir: str | Path | None = None) -> Path:
        """Export the (EMA) LoRA in the diffusers format (default: ``<output_dir>/lora``)."""
        return export_trained_lora(self.accelerator, self.policy, out_dir or self.out / "lora", self.ema, self.model)

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.iterations``; with ``stop_after`` stop (checkpointed) after that many iterations."""
        cfg, acc = self.cfg, self.accelerator
        last: dict[str, float] = {}
        end = cfg.train.iterations if stop_after is None else min(cfg.train.iterations, self.start_iteration + stop_after)
        iters = range(self.start_iteration, end)
        bar = tqdm(iters, desc=cfg.algorithm.upper(), initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (cfg.log.progress and acc.is_local_main_process))
        recent: list[float] = []
        try:
            if self.periodic_eval is not None and cfg.eval.at_start and self.start_iteration == 0 and end > 0:
                self.logger.log(self._evaluate(-1), -1)
            for it in bar:
                last = self.train_iteration(it)
                if self.periodic_eval is not None and self.periodic_eval.due(it):
                    last.update(self._evaluate(it))
                self.logger.log(last, it)
                recent = (recent + [last["reward/mean"]])[-10:]
                bar.set_postfix_str(progress_line(last, self.algorithm.name, recent), refresh=False)
                done = it + 1
                every = cfg.checkpoint.every
                if (every and done % every == 0) or done == end:
                    self._save(done)
            if end == cfg.train.iterations:
                self.export()
            if acc.is_main_process:
                print(where_line(self.out, exported=end == cfg.train.iterations, tensorboard=cfg.log.tensorboard),
                      flush=True)
            # Every rank is done: the process group ends here, not in the interpreter's teardown (where gloo's
            # threads can abort a finished rank: "terminate called without an active exception").
            acc.wait_for_everyone()
            acc.end_training()
        finally:
            self.logger.close()
            self.close()
        return last


def run(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> dict[str, float]:
    """Build a trainer for ``cfg`` and train it."""
    return Trainer(cfg, resume=resume).train(stop_after=stop_after)


__all__ = ["Trainer", "TrainingError", "CheckpointError", "run"]
