"""The Ray Train worker loop as a recipe: setup, train step, evaluate, save, cleanup (one process per GPU).

Reads the feature store through `ray.train.get_dataset_shard`; never runs the VAE or the text encoders. The model
is wrapped by `deepspeed.initialize` (the ZeRO stage from `resolve_zero_stage`, pipeline/train/models.py); the
reference is one component (pipeline/train/reference.py) and the objective one interface (pipeline/train/step.py)
that training and the holdout evaluation share.

On a GPU nothing inside a step waits for the device except one read of the non-finite flags per optimizer step,
after the last backward of the accumulation and before the update (a non-finite step is never applied). Metrics
stay on the device until a log line reads them in one transfer; every collective runs on the worker's device (NCCL
rejects CPU tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import AlignConfig
from pipeline.train.deepspeed_config import resolve_zero_stage
from pipeline.train import noise as noise_draws
from pipeline.train.distributed import DeviceMetrics, non_finite_flags, peak_memory_gib
from pipeline.train.models import LORA_TARGETS, TrainModels  # noqa: F401  (LORA_TARGETS: part of the interface)
from pipeline.train.step import PairBatch, apply_prompt_dropout, pair_rewards, policy_and_reference_mses, preference_loss

HOLDOUT_DRAWS = 4  # noise/timestep draws per held-apart pair: a steadier estimate than one
# Policy and reference MSEs closer than this count as a tie: two copies of one UNet in fp32 can differ by ~1e-7
# (other kernels for other memory layouts), which would otherwise read as a won or lost pair at step 0.
TIE_MSE = 1e-6


class NonFiniteLossError(FloatingPointError):
    pass


class TrainingOutOfMemoryError(RuntimeError):
    pass


@dataclass
class WorkerPlan:
    """What the driver works out once and every worker needs (plain values: it travels as a dict)."""

    model_path: str
    kind: str  # "sdxl" | "sd15"
    train_rows: int
    model_out: str  # URI of the final diffusers UNet folder / LoRA file
    holdout: Any = None  # ObjectRef of a numpy batch of held-apart rows, or None
    # Which files of model_path policy, reference and noise schedule load: the driver sets them from
    # model.revision / model.variant (pipeline.train.run.training_weights), as precompute loaded the base.
    revision: str | None = None
    variant: str | None = None


def setup_models(cfg: AlignConfig, plan: WorkerPlan, device: torch.device):
    """(engine, reference, scheduler, dtype): the models of pipeline.train.models.setup_models, unpacked."""
    from pipeline.train import models

    m = models.setup_models(cfg, plan, device)
    return m.engine, m.reference, m.scheduler, m.dtype


def out_of_memory_advice(cfg: AlignConfig, where: str) -> str:
    """What to change when the GPU runs out of memory: the settings that decide memory, and how each helps."""
    t, stage = cfg.train, resolve_zero_stage(cfg.train)
    advice = []
    if not t.gradient_checkpointing:
        advice.append("train.gradient_checkpointing=true (SDXL at 1024 px saves ~10x less activation memory)")
    if t.batch_size_per_worker > 1:
        advice.append(f"a smaller train.batch_size_per_worker with a larger train.grad_accum_steps (now "
                      f"{t.grad_accum_steps}) keeps the pairs per step")
    if stage < 3 and t.num_workers > 1:
        advice.append("train.zero_stage=3 partitions the weights and the reference across the GPUs")
    if not t.offload_optimizer:
        advice.append("train.offload_optimizer=true keeps Adam's state in host memory (slower steps)")
    if t.mode == "full":
        advice.append("train.mode=lora trains adapters only, with no second UNet")
    return (
        f"out of GPU memory {where} at train.batch_size_per_worker={t.batch_size_per_worker} (pairs per GPU per "
        f"micro-step), train.zero_stage={stage}, train.offload_optimizer={str(t.offload_optimizer).lower()}, "
        f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}, train.mode={t.mode}. To fit: "
        + "; ".join(advice or ["a GPU with more memory"])
        + ". bench/cost_model.py prints the memory per GPU each setting needs for SDXL and SD1.5."
    )


# -------------------------------------------------------------------------------------------------- data


def to_pair_batch(rows: dict[str, np.ndarray], *, sdxl: bool, device: torch.device, dtype: torch.dtype) -> PairBatch:
    def t(name: str, cast: torch.dtype = dtype) -> torch.Tensor:
        return noise_draws.to_device(torch.as_tensor(np.ascontiguousarray(rows[name])), device, cast)

    return PairBatch(
        pair_ids=[str(p) for p in rows["pair_id"]],
        latents_w=t("latents_w"),
        latents_l=t("latents_l"),
        prompt_embeds=t("prompt_embeds"),
        pooled_prompt_embeds=t("pooled_prompt_embeds") if sdxl else None,
        add_time_ids_w=t("add_time_ids_w") if sdxl else None,
        add_time_ids_l=t("add_time_ids_l") if sdxl else None,
        clip_text=t("clip_text", torch.float32),
        clip_image_w=t("clip_image_w", torch.float32),
        clip_image_l=t("clip_image_l", torch.float32),
        s_text=t("s_text", torch.float32) if "s_text" in rows else None,
        s_image=t("s_image", torch.float32) if "s_image" in rows else None,
    )


def steps_per_epoch(cfg: AlignConfig, train_rows: int, world_size: int) -> int:
    micro = (train_rows // world_size) // cfg.train.batch_size_per_worker
    steps = micro // cfg.train.grad_accum_steps
    if steps < 1:
        raise ValueError(
            f"the feature store's {train_rows} training pairs are too few for train.batch_size_per_worker="
            f"{cfg.train.batch_size_per_worker} x train.grad_accum_steps={cfg.train.grad_accum_steps} x "
            f"{world_size} workers: lower those or add data"
        )
    return steps


def micro_batches(shard, cfg: AlignConfig, *, start_step: int, per_epoch: int) -> Iterator[tuple[int, int, dict]]:
    """(step, micro_step, rows) from `start_step` on, epoch after epoch, in an order that only depends on the seed.

    A resumed run skips the micro-batches it already trained on, so it sees exactly what an uninterrupted run sees.
    Planned batches (train.batches=planned) come in the plan's order, every epoch: each micro-batch is this rank's
    slots of one planned global batch, so nothing may reorder them.
    """
    accum = cfg.train.grad_accum_steps
    planned = cfg.train.batches == "planned"
    epoch, done_in_epoch = divmod(start_step, per_epoch)
    while True:
        batches = shard.iter_batches(
            batch_size=cfg.train.batch_size_per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=None if planned else max(64, 4 * cfg.train.batch_size_per_worker),
            local_shuffle_seed=None if planned else cfg.train.seed + epoch,
        )
        for index, rows in enumerate(batches):
            if index >= per_epoch * accum:
                break
            if index < done_in_epoch * accum:
                continue
            step_in_epoch, micro = divmod(index, accum)
            yield epoch * per_epoch + step_in_epoch, micro, rows
        epoch, done_in_epoch = epoch + 1, 0


# ----------------------------------------------------------------------------------------------- evaluate


def holdout_metrics(models: TrainModels, cfg: AlignConfig, rows, *, sdxl: bool) -> dict:
    """Implicit preference accuracy (ties count half) and mean reward margin of the policy on held-apart pairs.

    Fixed draws per pair, so the value at step 0 (policy == reference: every reward 0, accuracy 0.5) and at the end
    are comparable. Every rank runs the whole sample: under ZeRO-3 all ranks must join each forward. The sums stay
    on the device and are read once.
    """
    if rows is None:  # no held-apart pairs in the store, or evaluate.holdout_pairs=0
        return {}
    engine, device = models.engine, models.engine.device
    wins = torch.zeros((), device=device, dtype=torch.float64)
    margins = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    engine.eval()
    with torch.no_grad():
        size = cfg.train.batch_size_per_worker
        for start in range(0, len(rows["pair_id"]), size):
            chunk = {k: v[start:start + size] for k, v in rows.items()}
            batch = to_pair_batch(chunk, sdxl=sdxl, device=device, dtype=models.dtype)
            for k in range(HOLDOUT_DRAWS):
                d = noise_draws.draw_for_batch(
                    batch.pair_ids, batch.latents_w, seed=cfg.train.seed, step=-1, micro_step=k,
                    num_train_timesteps=models.scheduler.config.num_train_timesteps, prompt_dropout=0.0,
                )
                m = policy_and_reference_mses(engine, models.reference, models.scheduler, batch, d.noise, d.timesteps)
                r_w, r_l = pair_rewards(m, beta=cfg.loss.beta)
                gap = (r_w - r_l).double()
                tie = gap.abs() <= cfg.loss.beta / 2 * TIE_MSE
                wins += ((gap > 0) & ~tie).sum() + 0.5 * tie.sum()
                margins += gap.sum()
                count += len(batch.pair_ids)
    engine.train()
    if count == 0:
        return {}
    return {"holdout_accuracy": wins.item() / count, "holdout_margin": margins.item() / count}


def holdout_due(cfg: AlignConfig, step: int) -> bool:
    """Whether the log line of optimizer step ``step`` carries the holdout metrics: at the last step, and every
    evaluate.every_steps (0 = never in between) so a sweep's scheduler can compare trials while they run."""
    every = cfg.evaluate.every_steps
    return step == cfg.train.max_steps or (every > 0 and step % every == 0)


# ------------------------------------------------------------------------------------------------- recipe


class Recipe:
    """One worker's run: `setup()`, then `train()` (micro-steps via `train_step`, logging, `save`), `evaluate()`
    at the start and the end, `cleanup()` (the export). Each part is a method so a bench can drive it."""

    def __init__(self, cfg: AlignConfig, plan: WorkerPlan, *, rank: int, world: int, device: torch.device):
        self.cfg, self.plan, self.rank, self.world, self.device = cfg, plan, rank, world, device
        self.sdxl = plan.kind == "sdxl"
        self.lora = cfg.train.mode == "lora"
        self.step = 0  # optimizer steps done
        self.metrics = DeviceMetrics(device)
        self.models: TrainModels | None = None
        self.empty_prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.holdout = None
        self.window: list[tuple[torch.Tensor, list[str]]] = []  # (loss, pair ids) of this step's micro-batches

    # -- setup

    def setup(self) -> None:
        import ray

        from pipeline.train import models
        from pipeline.train.checkpoint import restore

        self.models = self._guard_memory("while loading the models", lambda: models.setup_models(
            self.cfg, self.plan, self.device))
        self.metrics = DeviceMetrics(self.models.engine.device)
        self.step = restore(self.models.engine, lora=self.lora)
        if self.cfg.train.prompt_dropout > 0:
            from pipeline.precompute import load_empty_prompt

            prompt, pooled = load_empty_prompt(self.cfg.store_uri)
            dev = self.models.engine.device
            self.empty_prompt = (torch.as_tensor(prompt).to(dev),
                                 torch.as_tensor(pooled).to(dev) if self.sdxl else None)
        self.holdout = ray.get(self.plan.holdout) if self.plan.holdout is not None else None

    def _guard_memory(self, where: str, work):
        try:
            return work()
        except torch.cuda.OutOfMemoryError as error:
            raise TrainingOutOfMemoryError(out_of_memory_advice(self.cfg, where)) from error

    # -- one micro-step

    def train_step(self, step: int, micro: int, rows: dict[str, np.ndarray]) -> None:
        """Forward, loss, backward and (DeepSpeed decides, at the last micro-step) the optimizer step."""
        m, cfg = self.models, self.cfg
        batch = to_pair_batch(rows, sdxl=self.sdxl, device=m.engine.device, dtype=m.dtype)
        d = noise_draws.draw_for_batch(
            batch.pair_ids, batch.latents_w, seed=cfg.train.seed, step=step, micro_step=micro,
            num_train_timesteps=m.scheduler.config.num_train_timesteps, prompt_dropout=cfg.train.prompt_dropout,
        )
        if self.empty_prompt is not None:
            apply_prompt_dropout(batch, d.drop_prompt, self.empty_prompt)
        loss, metrics = preference_loss(m.engine, m.reference, m.scheduler, batch, d.noise, d.timesteps, cfg.loss)
        m.engine.backward(loss)
        self.window.append((loss.detach(), batch.pair_ids))
        if micro == cfg.train.grad_accum_steps - 1:
            self.stop_if_non_finite(step)
        m.engine.step()
        metrics["dropped_prompts"] = d.drop_prompt.float().mean()  # share of pairs trained on the empty prompt
        self.metrics.add({"loss": loss, **metrics}, weight=1.0 / cfg.train.grad_accum_steps)

    def stop_if_non_finite(self, step: int) -> None:
        """Read the accumulation window's non-finite flags (the one wait of a step, and one collective) before the
        optimizer step, so that a non-finite step is never applied; name the micro-batches that produced them."""
        losses, pair_ids = zip(*self.window)
        self.window = []
        flags = non_finite_flags(list(losses)).tolist()
        bad = [k for k, flag in enumerate(flags) if flag]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} in micro-batches {bad} of {len(flags)} (the first on pairs "
                f"{pair_ids[bad[0]]} of rank {self.rank}, or another rank's); the step was not applied and the last "
                f"checkpoint is intact. Lower train.lr or loss.beta, raise train.grad_clip or use "
                f"train.precision=bf16/fp32, then run the same command again to resume."
            )

    # -- evaluate / save / cleanup

    def evaluate(self) -> dict:
        return holdout_metrics(self.models, self.cfg, self.holdout, sdxl=self.sdxl)

    def save(self, logged: dict, *, checkpoint: bool) -> None:
        import ray.train

        from pipeline.train.checkpoint import save_and_report

        if checkpoint:
            save_and_report(self.models.engine, logged, step=self.step, lora=self.lora)
        else:
            ray.train.report(logged)

    def cleanup(self) -> None:
        from pipeline.train.checkpoint import export_model

        export_model(self.models.engine, self.plan, self.cfg, rank=self.rank)

    # -- the loop

    def log_line(self, *, elapsed: float, window_steps: int, start_holdout: dict) -> dict:
        t, engine = self.cfg.train, self.models.engine
        grad_norm = engine.get_global_grad_norm()
        logged = self.metrics.mean_across_ranks()  # the one host read of the window's metrics
        logged.update(
            step=self.step,
            lr=engine.get_lr()[0],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            # Updates DeepSpeed dropped for non-finite gradients (fp16's loss scaling; bf16/fp32: a sign of trouble).
            # It skips them without a word, so they are counted here (since the run began, kept in checkpoints).
            skipped_steps=engine.skipped_steps,
            samples_per_s=self.world * t.batch_size_per_worker * t.grad_accum_steps * window_steps / elapsed,
            **peak_memory_gib(engine.device),
        )
        if holdout_due(self.cfg, self.step):  # every evaluate.every_steps (for ASHA) and at the end
            logged.update(self.evaluate())
        if self.step == t.max_steps:
            logged.update({f"start_{k}": v for k, v in start_holdout.items()})
        return logged

    def train(self, shard) -> None:
        t = self.cfg.train
        start_holdout = self.evaluate() if self.step == 0 else {}
        if self.rank == 0 and start_holdout:
            print(f"[train] step 0 holdout: {_fmt(start_holdout)}", flush=True)
        if self.step >= t.max_steps:
            return
        per_epoch = steps_per_epoch(self.cfg, self.plan.train_rows, self.world)
        first_step, skipped = self.step, self.models.engine.skipped_steps
        window_steps, tick = 0, time.perf_counter()
        for step_now, micro, rows in micro_batches(shard, self.cfg, start_step=self.step, per_epoch=per_epoch):
            if step_now == first_step:
                self._guard_memory(f"in the first training step (step {step_now})",
                                   lambda: self.train_step(step_now, micro, rows))
            else:
                self.train_step(step_now, micro, rows)
            if micro < t.grad_accum_steps - 1:
                continue
            self.step, window_steps = step_now + 1, window_steps + 1
            self.metrics.step_done()
            checkpoint_now = self.step % t.checkpoint_every == 0 or self.step == t.max_steps
            if self.step % t.log_every == 0 or checkpoint_now or holdout_due(self.cfg, self.step):
                now = time.perf_counter()
                logged = self.log_line(elapsed=now - tick, window_steps=window_steps, start_holdout=start_holdout)
                if self.rank == 0:
                    print(f"[train] step {self.step}/{t.max_steps} {_fmt(logged)}", flush=True)
                    if logged["skipped_steps"] > skipped:
                        print(f"[train] warning: DeepSpeed skipped {logged['skipped_steps'] - skipped} optimizer "
                              f"step(s) since the last line: their gradients were not finite, so nothing was "
                              f"applied (in bf16/fp32 lower train.lr or raise train.grad_clip if this repeats)",
                              flush=True)
                skipped = logged["skipped_steps"]
                self.save(logged, checkpoint=checkpoint_now)
                window_steps, tick = 0, now  # since the last log line, so the next includes this line's report
            if self.step >= t.max_steps:
                break


def train_dataset_name(cfg: AlignConfig, rank: int) -> str:
    """Random batches: one dataset that Ray Train splits among the workers. Planned batches: one per rank (its slots
    of every planned batch), unsplit, so each worker reads exactly its part of each global batch."""
    return f"train_rank_{rank}" if cfg.train.batches == "planned" else "train"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = AlignConfig.from_dict(config["cfg"])
    plan = WorkerPlan(**config["plan"])
    ctx = ray.train.get_context()
    recipe = Recipe(cfg, plan, rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                    device=ray.train.torch.get_device())
    recipe.setup()
    recipe.train(ray.train.get_dataset_shard(train_dataset_name(cfg, ctx.get_world_rank())))
    recipe.cleanup()


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
