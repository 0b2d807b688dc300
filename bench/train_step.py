"""Where a training step's time and memory go, on the tiny SDXL, measured against the issue's goals.

Run from the repository root:

    .venv/bin/python bench/train_step.py                        # CPU: 64 px images (8x8 latents), ~1-2 min
    python3 bench/train_step.py --resolution 512                # a GPU: 512 px (64x64 latents), bf16
    python3 bench/train_step.py --resolution 512 --batch 8
    python3 bench/train_step.py --unet sdxl --resolution 1024 --batch 1 --out /tmp/sdxl.json   # a big GPU

`--unet sd15|sdxl` times a UNet of the real model's size and shape (random weights: timing only; SDXL's is 2.6B
parameters and wants ~100 GB of GPU memory with its optimizer state) on synthetic rows of the real embedding
shapes, one process only (the two-worker part needs two GPUs for such a model, and encoding in the loop needs the
real encoders). That answers the step-vs-bare-UNet goal where it matters: at the tiny model's size every step is
dominated by fixed per-step costs (kernel launches, DeepSpeed's step), which a real UNet's work dwarfs.

The GPU commands need the repository on PYTHONPATH and torch, diffusers, deepspeed, transformers, open_clip_torch,
pyarrow and pyyaml; Ray only where the rows are not cached yet (step 1).

Steps, in order:

1. Rows. The library builds the tiny SDXL and a toy feature store (`run_precompute` on a local Ray, under
   bench/results/work/bench-train-step-<resolution>px-b<batch>/), and `read_training_dataset(...).take_batch` gives
   2 x --batch training rows. They are cached there (rows/: the rows as rows.npz, the raw images and captions of the
   same pairs as raw.parquet, the model kind in kind.txt), so a later run, or a machine without Ray, skips this
   step: copy rows/ and tiny_model/ to a GPU machine.
2. Phases, in this process: a world-size-1 torch.distributed group and the worker's own `setup_models` (the
   DeepSpeed config one worker gets: ZeRO-1 under `train.zero_stage=auto`; optimizer and frozen reference). Each
   repeat runs, one after the other so that a busy machine slows them alike:
   - one step split into data (`to_pair_batch` + noise draws), policy forward (`pair_mses`), reference forward,
     loss, backward (`engine.backward`), optimizer (`engine.step`);
   - one whole step with RPO, one with DPO: data + `preference_loss` + `engine.backward` + `engine.step`;
   - the bare UNet work a step contains, on a plain UNet without DeepSpeed: policy forward+backward and
     reference forward on the same batch;
   - what a trainer without a feature store does per batch (as diffusers' SDXL training example does): decode
     and crop the winner and loser images, VAE-encode them, encode the captions, CLIP-embed captions and images;
     next to reading the batch from the store (`to_pair_batch`).
3. Two workers, spawned per ZeRO stage (2, then 3): NCCL and one GPU each where there are two GPUs, else gloo
   on the CPU (NCCL cannot put two ranks on one GPU): a few whole RPO steps, each worker's peak memory (CUDA: `max_memory_allocated`; CPU: the peak resident
   set, VmHWM, less the resident set before the model is loaded) and the bytes of the tensors it still holds
   after the steps (weights, gradients, optimizer state, ZeRO's buffers), and its step time. The ZeRO-2 pair then
   times the RPO loss over the global batch (`rpo_loss_global`, with its all-gathers) against the local
   `rpo_loss` on the same rows, forward+backward.

Goals (issue), as ratios of numbers from the same run: RPO step <= 1.02 x DPO step; whole step <= 1.05 x the bare
UNet work; the gather's extra time < 5% of a whole step. Prints one table and writes bench/results/train_step.json.
Timings are medians over --repeats after warm-up, with the device synchronised around each timer.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "train_step.json"
WORK = Path(__file__).parent / "results" / "work"
WARMUP = 3
WORKERS = 2
WORKER_STEPS = 4  # whole steps per worker in the ZeRO runs (the first is warm-up for the step time)
GATHER_REPEATS = 200  # the losses on [B] vectors take well under a millisecond: many repeats for a stable median
GOAL_RPO_OVER_DPO = 1.02
GOAL_STEP_OVER_UNET = 1.05
GOAL_GATHER_SHARE = 0.05
GOAL_LORA_SPEEDUP = 1.3  # plain loop's step / ours, LoRA DPO on the CPU


# ------------------------------------------------------------------------------------------------ set-up


def set_environment(device: str) -> None:
    """Before Ray or DeepSpeed is imported: a local throw-away Ray, DeepSpeed's CPU accelerator on the CPU."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_deepspeed() -> None:
    """DeepSpeed's info logs, and torch's deprecation warnings for the collectives DeepSpeed calls, hide the table."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def bench_config(args: argparse.Namespace, *overrides: str):
    from pipeline.config import load_config

    return load_config(None, [
        f"name={run_name(args)}",
        f"cluster.storage_path={WORK}",
        "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",  # timing only: random weights do the same work
        f"data.toy_pairs={4 * args.batch + 4}",
        f"data.toy_resolution={args.resolution}",
        "data.holdout_fraction=0.0",  # every pair in the train split
        f"precompute.resolution={args.resolution}",
        "precompute.actor_num_cpus=0.5",
        f"train.batch_size_per_worker={args.batch}",
        "train.max_steps=1000000",  # the lr schedule must not run out during the repeats
        f"train.use_gpu={'true' if args.device.startswith('cuda') else 'false'}",
        f"train.compile={'inductor' if getattr(args, 'compile', False) else 'null'}",
        *overrides,
    ])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, backend: str) -> None:
    """The environment Ray Train gives a worker, then the default group DeepSpeed picks up."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)


# -------------------------------------------------------------------------------------------------- rows


def run_name(args: argparse.Namespace) -> str:
    """One run folder (tiny model, toy world, store, cached rows) per resolution and batch: the toy world's pairs
    depend on how many it has, so a store must not be shared between batch sizes."""
    return f"bench-train-step-{args.resolution}px-b{args.batch}"


def rows_cache(args: argparse.Namespace) -> Path:
    return WORK / run_name(args) / "rows"


def save_rows(folder: Path, data: dict[str, Any]) -> None:
    """Plain formats, nothing executable: numpy arrays (pair ids as fixed-width text), an Arrow table, a text file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = {key: np.asarray(value, dtype=str) if key == "pair_id" else value for key, value in data["rows"].items()}
    np.savez(folder / "rows.npz", **rows)
    pq.write_table(pa.table(data["raw"]), folder / "raw.parquet")
    (folder / "kind.txt").write_text(data["kind"])


def read_rows(folder: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    with np.load(folder / "rows.npz", allow_pickle=False) as arrays:
        rows = {key: arrays[key] for key in arrays.files}
    return {"rows": rows, "raw": pq.read_table(folder / "raw.parquet").to_pydict(),
            "kind": (folder / "kind.txt").read_text()}


def load_rows(args: argparse.Namespace) -> dict[str, Any]:
    """{"rows": store rows (numpy), "raw": captions + image bytes of the same pairs, "kind": "sdxl"}; cached."""
    cache = rows_cache(args)
    if (cache / "kind.txt").exists():  # written last: a complete cache
        return read_rows(cache)
    import ray

    from pipeline.data import load_preferences
    from pipeline.precompute import read_training_dataset, resolve_data_source, run_precompute

    cfg = bench_config(args)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        summary = run_precompute(cfg)
        rows = read_training_dataset(summary["store_uri"], split="train").take_batch(
            WORKERS * args.batch, batch_format="numpy"
        )
    finally:
        ray.shutdown()
    if len(rows["pair_id"]) < WORKERS * args.batch:
        raise RuntimeError(
            f"the toy store {summary['store_uri']} gave {len(rows['pair_id'])} training rows, fewer than the "
            f"{WORKERS} x --batch {args.batch} this benchmark needs; delete {WORK} and run again"
        )
    pairs = load_preferences(resolve_data_source(cfg)).pairs.to_pylist()
    by_id = {p["pair_id"]: p for p in pairs}
    chosen = [by_id[str(pair_id)] for pair_id in rows["pair_id"]]
    data = {
        "rows": rows,
        "raw": {key: [p[key] for p in chosen] for key in ("caption", "image_w", "image_l")},
        "kind": read_kind(summary["store_uri"]),
    }
    save_rows(cache, data)
    return data


def read_kind(store_uri: str) -> str:
    from pipeline.precompute import read_manifest

    return read_manifest(store_uri)["model"]["kind"]


# Diffusers UNet configs of the real models' shapes (SD1.5: runwayml/stable-diffusion-v1-5; SDXL: base 1.0).
FULL_UNETS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        cross_attention_dim=2048, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def full_size_model(args: argparse.Namespace, tiny_model_path: str) -> str:
    """A pipeline folder with a full-size random UNet (and the tiny model's DDPM schedule), built on the device."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = WORK / f"full-{args.unet}"
    if (folder / "unet" / "config.json").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(tiny_model_path) / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    index = {"_class_name": PIPELINE_CLASS[args.unet], "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with torch.device(args.device):  # random init of 10^9 parameters takes minutes on a CPU, seconds on a GPU
        unet = UNet2DConditionModel(sample_size=args.resolution // 8, **FULL_UNETS[args.unet])
    unet.to(torch.bfloat16).save_pretrained(folder / "unet")
    del unet
    return str(folder)


def synthetic_rows(args: argparse.Namespace) -> dict[str, Any]:
    """Rows of the real models' embedding shapes (SD1.5: text 768; SDXL: text 2048, pooled 1280), random values."""
    n, res, sdxl = WORKERS * args.batch, args.resolution, args.unet == "sdxl"
    rng = np.random.default_rng(0)

    def normal(*shape: int, dtype=np.float16) -> np.ndarray:
        return rng.standard_normal((n, *shape)).astype(dtype)

    time_ids = np.tile(np.array([res, res, 0, 0, res, res], dtype=np.float32), (n, 1))
    rows = {
        "pair_id": np.array([f"synthetic-{i}" for i in range(n)]),
        "latents_w": normal(4, res // 8, res // 8), "latents_l": normal(4, res // 8, res // 8),
        "prompt_embeds": normal(77, FULL_UNETS[args.unet]["cross_attention_dim"]),
        "pooled_prompt_embeds": normal(1280) if sdxl else normal(0),
        "add_time_ids_w": time_ids, "add_time_ids_l": time_ids.copy(),
        "clip_text": normal(1024, dtype=np.float32), "clip_image_w": normal(1024, dtype=np.float32),
        "clip_image_l": normal(1024, dtype=np.float32),
    }
    return {"rows": rows, "raw": None, "kind": args.unet}


def rows_of_rank(rows: dict[str, np.ndarray], rank: int, batch: int) -> dict[str, np.ndarray]:
    return {key: value[rank * batch : (rank + 1) * batch] for key, value in rows.items()}


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    """(work's result, its wall time in ms), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {key: statistics.median(values) for key, values in samples.items()}


@dataclasses.dataclass
class Trainer:
    """What the worker holds after `setup_models`, and what a step needs besides the rows."""

    cfg: Any
    engine: Any
    reference: Any  # pipeline.train.reference.Reference: callable like the UNet
    scheduler: Any
    dtype: torch.dtype
    device: torch.device
    sdxl: bool

    def batch(self, rows: dict[str, np.ndarray], step: int):
        """The data phase: rows -> PairBatch on the device, and this step's noise and timesteps."""
        from pipeline.train import noise as noise_draws
        from pipeline.train.worker import to_pair_batch

        batch = to_pair_batch(rows, sdxl=self.sdxl, device=self.device, dtype=self.dtype)
        draws = noise_draws.draw_for_batch(  # the worker's own helper: same draws, same transfers
            batch.pair_ids, batch.latents_w, seed=self.cfg.train.seed, step=step, micro_step=0,
            num_train_timesteps=self.scheduler.config.num_train_timesteps, prompt_dropout=0.0,
        )
        return batch, draws.noise, draws.timesteps

    def whole_step(self, rows: dict[str, np.ndarray], step: int, loss_cfg) -> None:
        from pipeline.train.step import preference_loss

        batch, noise, timesteps = self.batch(rows, step)
        loss, _ = preference_loss(self.engine, self.reference, self.scheduler, batch, noise, timesteps, loss_cfg)
        self.engine.backward(loss)
        self.engine.step()


def make_trainer(cfg, model_path: str, kind: str, device: torch.device) -> Trainer:
    from pipeline.train.worker import WorkerPlan, setup_models

    plan = WorkerPlan(model_path=model_path, kind=kind, train_rows=0, model_out="")
    engine, reference, scheduler, dtype = setup_models(cfg, plan, device)
    return Trainer(cfg, engine, reference, scheduler, dtype, engine.device, kind == "sdxl")


def phased_step(trainer: Trainer, rows: dict[str, np.ndarray], step: int) -> dict[str, float]:
    """One RPO step cut into its phases, each timed alone (ms). Same work as `preference_loss` + backward + step."""
    from pipeline import losses
    from pipeline.train.step import pair_mses

    t, dev, loss_cfg = {}, trainer.device, trainer.cfg.loss
    (batch, noise, timesteps), t["data"] = timed(dev, lambda: trainer.batch(rows, step))
    (mse_w, mse_l), t["policy_forward"] = timed(
        dev, lambda: pair_mses(trainer.engine, trainer.scheduler, batch, noise, timesteps, winners_only=False)
    )
    with torch.no_grad():
        (ref_w, ref_l), t["reference_forward"] = timed(
            dev, lambda: pair_mses(trainer.reference, trainer.scheduler, batch, noise, timesteps, winners_only=False)
        )
    (loss, _), t["loss"] = timed(dev, lambda: losses.rpo_loss_global(
        mse_w, mse_l, ref_w, ref_l, batch.clip_text, batch.clip_image_w, batch.clip_image_l,
        beta=loss_cfg.beta, alpha=loss_cfg.alpha, tau=loss_cfg.tau,
    ))
    _, t["backward"] = timed(dev, lambda: trainer.engine.backward(loss))
    _, t["optimizer"] = timed(dev, trainer.engine.step)
    return t


def bare_unet_work(trainer: Trainer, plain_unet: torch.nn.Module, rows: dict[str, np.ndarray], step: int) -> dict[str, float]:
    """ms of the UNet work a step contains, without DeepSpeed: policy forward+backward, reference forward."""
    from pipeline.train.step import pair_mses

    batch, noise, timesteps = trainer.batch(rows, step)
    plain_unet.zero_grad(set_to_none=True)

    def policy() -> None:
        mse_w, mse_l = pair_mses(plain_unet, trainer.scheduler, batch, noise, timesteps, winners_only=False)
        (mse_w.sum() + mse_l.sum()).backward()

    @torch.no_grad()
    def reference() -> None:
        pair_mses(trainer.reference, trainer.scheduler, batch, noise, timesteps, winners_only=False)

    return {"bare_policy_forward_backward": timed(trainer.device, policy)[1],
            "bare_reference_forward": timed(trainer.device, reference)[1]}


class InLoopEncoder:
    """What a trainer without a feature store runs on every batch: images -> latents, captions -> embeddings."""

    def __init__(self, cfg, model_path: str, kind: str, device: torch.device):
        from pipeline.models.clip import ClipEmbedder
        from pipeline.models.loader import load_components
        from pipeline.models.resolve import resolve_clip_pretrained

        parts = load_components(model_path, kind=kind, parts=("vae", "text"), device=device)
        self.vae = parts.vae.requires_grad_(False)
        self.text_encoders = [encoder.requires_grad_(False) for encoder in parts.text_encoders]
        self.tokenizers = parts.tokenizers
        self.clip = ClipEmbedder(cfg.model.clip_model, resolve_clip_pretrained(cfg), device=str(device))
        self.cfg, self.kind, self.device = cfg, kind, device

    @torch.no_grad()
    def __call__(self, raw: dict[str, list]) -> None:
        from PIL import Image

        from pipeline.data.images import decode_image
        from pipeline.models.text import encode_prompts
        from pipeline.precompute.stages import prepare_image, vae_input

        crops = [
            prepare_image(decode_image(data, max_image_pixels=self.cfg.data.max_image_pixels), self.cfg.precompute.resolution)
            for data in raw["image_w"] + raw["image_l"]
        ]
        pixels = np.stack([crop.pixels for crop in crops])
        # Diffusers' example samples the posterior each step; the cost is the encoder's either way.
        self.vae.encode(vae_input(pixels).to(self.device)).latent_dist.sample()
        encode_prompts(self.text_encoders, self.tokenizers, raw["caption"], kind=self.kind, device=self.device)
        self.clip.embed_texts(raw["caption"])
        self.clip.embed_images([Image.fromarray(crop.pixels) for crop in crops])


def time_one_process(args: argparse.Namespace, data: dict[str, Any], model_path: str) -> dict[str, Any]:
    """Phases, whole RPO and DPO steps, bare UNet work, store read vs encoding in the loop: medians in ms."""
    from pipeline.models.loader import load_components
    from pipeline.train.deepspeed_config import resolve_zero_stage
    from pipeline.train.worker import to_pair_batch

    device = torch.device(args.device)
    init_process_group(0, 1, free_port(), "nccl" if device.type == "cuda" else "gloo")
    quiet_deepspeed()
    try:
        cfg = bench_config(args)
        trainer = make_trainer(cfg, model_path, data["kind"], device)
        plain_unet = load_components(model_path, kind=data["kind"], parts=("unet",), dtype=trainer.dtype,
                                     device=trainer.device).unet
        rows = rows_of_rank(data["rows"], 0, args.batch)
        dpo = dataclasses.replace(cfg.loss, objective="dpo")
        dev = trainer.device

        runs: dict[str, Callable[[int], dict[str, float]]] = {
            "phases": lambda step: {f"phase_{k}": v for k, v in phased_step(trainer, rows, step).items()},
            "step_rpo": lambda step: {"step_rpo": timed(dev, lambda: trainer.whole_step(rows, step, cfg.loss))[1]},
            "step_dpo": lambda step: {"step_dpo": timed(dev, lambda: trainer.whole_step(rows, step, dpo))[1]},
            "bare": lambda step: bare_unet_work(trainer, plain_unet, rows, step),
            "store_read": lambda step: {"store_read": timed(
                dev, lambda: to_pair_batch(rows, sdxl=trainer.sdxl, device=dev, dtype=trainer.dtype))[1]},
        }
        if data["raw"] is not None:  # the tiny model's own encoders and the toy images (not for --unet sd15/sdxl)
            encoder = InLoopEncoder(cfg, model_path, data["kind"], trainer.device)
            raw = {k: v[: args.batch] for k, v in data["raw"].items()}
            runs["encode_in_loop"] = lambda step: {"encode_in_loop": timed(dev, lambda: encoder(raw))[1]}
        samples: dict[str, list[float]] = {}
        for step in range(WARMUP + args.repeats):
            # Every kind of work once per repeat, in alternating order, so a busy machine slows all of them alike.
            for run in list(runs.values())[:: 1 if step % 2 == 0 else -1]:
                for key, value in run(step).items():
                    if step >= WARMUP:
                        samples.setdefault(key, []).append(value)
        result = medians(samples)
        result["bare_unet_work"] = result["bare_policy_forward_backward"] + result["bare_reference_forward"]
        result["unet_parameters"] = sum(p.numel() for p in plain_unet.parameters())
        result["latent_shape"] = list(rows["latents_w"].shape[1:])
        result["peak_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        result["precision"] = str(trainer.dtype).removeprefix("torch.")
        result["zero_stage"] = resolve_zero_stage(cfg.train)  # train.zero_stage=auto at one worker: 1
        return result
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------- two workers


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes (Linux): VmRSS, the resident set now; VmHWM, its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; the CPU memory figure needs Linux")


def reset_peak_rss() -> None:
    """Make VmHWM the current resident set, so the peak read later is this phase's, not the imports'."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of the distinct tensor storages on `device` this process still references: weights, gradients,
    optimizer state, buffers. Unlike the peak, it shows what ZeRO partitions, also on the CPU."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device == device:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def gather_timing(trainer: Trainer, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """RPO loss forward+backward on this rank's MSEs: over the global batch (all-gathers) vs this rank alone (ms)."""
    from pipeline import losses

    batch, _, _ = trainer.batch(rows, 0)
    loss_cfg, dev = trainer.cfg.loss, trainer.device
    embeddings = (batch.clip_text, batch.clip_image_w, batch.clip_image_l)
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())

    def mses() -> list[torch.Tensor]:
        return [(0.2 + 0.01 * torch.rand(len(batch.pair_ids), generator=generator)).to(dev).requires_grad_()
                for _ in range(4)]

    def global_loss() -> None:
        loss, _ = losses.rpo_loss_global(*mses(), *embeddings, beta=loss_cfg.beta, alpha=loss_cfg.alpha, tau=loss_cfg.tau)
        loss.backward()

    def local_loss() -> None:
        weights = losses.similarity_weights(*embeddings, alpha=loss_cfg.alpha, tau=loss_cfg.tau)
        losses.rpo_loss(*mses(), weights, beta=loss_cfg.beta).backward()

    samples: dict[str, list[float]] = {"rpo_loss_global": [], "rpo_loss_local": []}
    for repeat in range(WARMUP + GATHER_REPEATS):
        for key, work in (("rpo_loss_global", global_loss), ("rpo_loss_local", local_loss)):
            torch.distributed.barrier()  # both ranks start together: the gather then waits for nobody slow
            _, ms = timed(dev, work)
            if repeat >= WARMUP:
                samples[key].append(ms)
    return medians(samples)


def worker_main(rank: int, port: int, stage: int, args: argparse.Namespace, model_path: str, out_dir: str) -> None:
    """One of the 2 spawned workers: whole RPO steps under ZeRO-`stage`, peak memory, and (ZeRO-2) the gather."""
    torch.set_num_threads(1)  # as in a 1-CPU Ray Train worker (Ray sets OMP_NUM_THREADS to the worker's CPUs)
    gpus = args.device.startswith("cuda") and torch.cuda.device_count() >= WORKERS
    if gpus:
        torch.cuda.set_device(rank)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported: fewer GPUs than workers -> the CPU
    init_process_group(rank, WORKERS, port, "nccl" if gpus else "gloo")
    quiet_deepspeed()
    data = read_rows(rows_cache(args))
    rows = rows_of_rank(data["rows"], rank, args.batch)
    device = torch.device("cuda", rank) if gpus else torch.device("cpu")
    cfg = bench_config(args, f"train.zero_stage={stage}", f"train.num_workers={WORKERS}")
    # The libraries are imported (by quiet_deepspeed and here) before the baseline, so the CPU figure is what the
    # model, its optimizer state and the steps add, not the hundreds of MiB that importing them costs.
    import pipeline.models.loader  # noqa: F401
    import pipeline.train.worker  # noqa: F401

    if gpus:
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")

    trainer = make_trainer(cfg, model_path, data["kind"], device)
    step_ms = []
    for step in range(WORKER_STEPS):
        torch.distributed.barrier()
        step_ms.append(timed(device, lambda: trainer.whole_step(rows, step, cfg.loss))[1])
    result: dict[str, Any] = {"step_ms": statistics.median(step_ms[1:]), "device": str(device),
                              "live_tensor_bytes": live_tensor_bytes(device)}
    if gpus:
        result.update(memory="cuda_max_memory_allocated", peak_bytes=torch.cuda.max_memory_allocated(device))
    else:
        result.update(memory="peak_rss_growth", peak_bytes=proc_status_bytes("VmHWM") - rss_before)
    if stage == 2:
        result.update(gather_timing(trainer, rows))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def time_two_workers(args: argparse.Namespace, model_path: str) -> dict[int, list[dict[str, Any]]]:
    """{zero stage: [rank 0's result, rank 1's result]} from two spawned worker processes per stage."""
    per_stage = {}
    for stage in (2, 3):
        with tempfile.TemporaryDirectory() as out_dir:
            torch.multiprocessing.spawn(
                worker_main, args=(free_port(), stage, args, model_path, out_dir), nprocs=WORKERS, join=True
            )
            per_stage[stage] = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORKERS)]
    return per_stage


# ------------------------------------------------------------------------------------- LoRA vs plain loop


class PlainLoraLoop:
    """What a plain single-process diffusers + peft trainer does per LoRA DPO step, with no feature store and no
    DeepSpeed: decode and crop the images, VAE-encode them, encode the captions, then the same noise draws, the
    policy forward over [winners; losers], the reference forward with the adapters off, DPO, backward, gradient
    clipping, AdamW and the lr schedule's step (what diffusers' SDXL DPO example does every step)."""

    def __init__(self, cfg, model_path: str, kind: str):
        from peft import LoraConfig

        from pipeline.models.loader import load_components
        from pipeline.train.models import LORA_TARGETS

        parts = load_components(model_path, kind=kind, parts=("unet", "vae", "text", "scheduler"))
        self.unet, self.vae, self.scheduler = parts.unet, parts.vae.requires_grad_(False), parts.scheduler
        self.text_encoders = [encoder.requires_grad_(False) for encoder in parts.text_encoders]
        self.tokenizers, self.cfg, self.kind = parts.tokenizers, cfg, kind
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=cfg.train.lora_rank, lora_alpha=cfg.train.lora_alpha,
                                         init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def step(self, raw: dict[str, list], step: int) -> None:
        from pipeline import losses
        from pipeline.data.images import decode_image
        from pipeline.models.text import encode_prompts, sdxl_add_time_ids
        from pipeline.precompute.stages import prepare_image, vae_input
        from pipeline.train import noise as noise_draws
        from pipeline.train.step import unet_mse

        res, n = self.cfg.precompute.resolution, len(raw["caption"])
        crops = [prepare_image(decode_image(data, max_image_pixels=self.cfg.data.max_image_pixels), res)
                 for data in raw["image_w"] + raw["image_l"]]
        with torch.no_grad():
            latents = self.vae.encode(vae_input(np.stack([c.pixels for c in crops]))).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            prompt, pooled = encode_prompts(self.text_encoders, self.tokenizers, raw["caption"], kind=self.kind)
        d = noise_draws.draw_for_batch([f"plain-{i}" for i in range(n)], latents[:n], seed=0, step=step,
                                       micro_step=0, num_train_timesteps=self.scheduler.config.num_train_timesteps,
                                       prompt_dropout=0.0)
        two = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        time_ids = two(torch.tensor([sdxl_add_time_ids((res, res), (0, 0), (res, res))] * n, dtype=torch.float32)) \
            if pooled is not None else None
        args = (self.scheduler, latents, two(d.noise), two(d.timesteps), two(prompt), two(pooled), time_ids)
        mse = unet_mse(self.unet, *args)
        with torch.no_grad():
            self.unet.disable_adapters()
            ref = unet_mse(self.unet, *args)
            self.unet.enable_adapters()
        loss = losses.dpo_loss(*mse.chunk(2), *ref.chunk(2), beta=self.cfg.loss.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def alternating_medians(device: torch.device, repeats: int, runs: dict[str, Callable[[int], Any]]) -> dict[str, float]:
    """Median ms of each run(step) after WARMUP steps, the runs alternating in order and reverse order every other
    step, so a busy machine slows them alike."""
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for step in range(WARMUP + repeats):
        for key in list(runs)[:: 1 if step % 2 == 0 else -1]:
            ms = timed(device, lambda: runs[key](step))[1]
            if step >= WARMUP:
                samples[key].append(ms)
    return medians(samples)


def lora_vs_plain(args: argparse.Namespace, data: dict[str, Any], model_path: str) -> dict[str, float]:
    """Median ms of our LoRA DPO step (worker's setup_models, feature-store rows, DeepSpeed) and of the plain loop
    on the same pairs, alternating; `plain_over_ours` > 1 means ours is faster."""
    init_process_group(0, 1, free_port(), "gloo")
    quiet_deepspeed()
    try:
        cfg = bench_config(args, "train.mode=lora", "loss.objective=dpo")
        trainer = make_trainer(cfg, model_path, data["kind"], torch.device("cpu"))
        plain = PlainLoraLoop(cfg, model_path, data["kind"])
        rows = rows_of_rank(data["rows"], 0, args.batch)
        raw = {k: v[: args.batch] for k, v in data["raw"].items()}
        result = alternating_medians(trainer.device, args.repeats, {
            "ours": lambda step: trainer.whole_step(rows, step, cfg.loss), "plain": lambda step: plain.step(raw, step)})
        from pipeline.train.deepspeed_config import resolve_zero_stage

        result["plain_over_ours"] = result["plain"] / result["ours"]
        result["zero_stage"] = resolve_zero_stage(cfg.train)
        return result
    finally:
        torch.distributed.destroy_process_group()


def zero1_vs_zero2(args: argparse.Namespace, data: dict[str, Any], model_path: str) -> dict[str, float]:
    """Median ms of a full fine-tune RPO step on one worker under ZeRO-1 (no gradient hooks) and ZeRO-2, the two
    engines alternating on the same rows and steps; then the largest weight difference between them (0: same maths)."""
    device = torch.device(args.device)
    init_process_group(0, 1, free_port(), "nccl" if device.type == "cuda" else "gloo")
    quiet_deepspeed()
    try:
        stages = (1, 2)
        configs = {stage: bench_config(args, "train.mode=full", f"train.zero_stage={stage}") for stage in stages}
        trainers = {stage: make_trainer(configs[stage], model_path, data["kind"], device) for stage in stages}
        rows = rows_of_rank(data["rows"], 0, args.batch)
        result = alternating_medians(device, args.repeats, {
            f"zero{stage}": lambda step, t=trainers[stage], c=configs[stage]: t.whole_step(rows, step, c.loss)
            for stage in stages})
        result["zero2_over_zero1"] = result["zero2"] / result["zero1"]
        weights = [dict(trainers[stage].engine.module.named_parameters()) for stage in stages]
        result["max_weight_difference"] = max(
            (weights[0][name].detach() - weights[1][name].detach()).abs().max().item() for name in weights[0])
        return result
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ report


def write_comparison(args: argparse.Namespace, default_name: str, result: dict[str, Any]) -> Path:
    """A one-question run's JSON (the arguments and the result): --out, else bench/results/<default_name>."""
    out = args.out if args.out != RESULTS else RESULTS.with_name(default_name)
    out.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2) + "\n")
    return out


def goal(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"name": name, "value": value, "goal_at_most": limit, "pass": value <= limit,
            "margin": value - limit}


def print_table(one: dict[str, Any], two: dict[int, list[dict[str, Any]]], goals: list[dict[str, Any]], header: str) -> None:
    phases = [k for k in one if k.startswith("phase_")]
    policy = one["phase_policy_forward"] + one["phase_backward"]
    lines = [
        ("step phases (one RPO step, each timed alone)", None),
        *[(f"  {k.removeprefix('phase_').replace('_', ' ')}", one[k]) for k in phases],
        ("  policy forward+backward (forward + backward)", policy),
        ("  sum of the phases", sum(one[k] for k in phases)),
        ("whole step, RPO", one["step_rpo"]),
        ("whole step, DPO", one["step_dpo"]),
        ("bare UNet work (a plain UNet, no DeepSpeed)", one["bare_unet_work"]),
        ("  policy forward+backward", one["bare_policy_forward_backward"]),
        ("  reference forward", one["bare_reference_forward"]),
        ("batch from the feature store (to_pair_batch)", one["store_read"]),
    ]
    if "encode_in_loop" in one:
        lines.append(("batch encoded in the loop (decode, VAE, text encoders, CLIP)", one["encode_in_loop"]))
    if two:
        lines += [
            ("RPO loss fwd+bwd at 2 workers, global batch (rank 0)", two[2][0]["rpo_loss_global"]),
            ("RPO loss fwd+bwd at 2 workers, local batch (rank 0)", two[2][0]["rpo_loss_local"]),
            *[(f"whole RPO step at 2 workers, ZeRO-{stage} (rank 0)", two[stage][0]["step_ms"]) for stage in (2, 3)],
        ]
    print(header)
    width = max(len(label) for label, _ in lines) + 2
    for label, ms in lines:
        print(f"{label:<{width}}" + ("" if ms is None else f"{ms:>10.2f} ms"))
    if one.get("peak_bytes"):
        print(f"peak GPU memory of the one-process run (policy, its optimizer, reference, plain UNet): "
              f"{one['peak_bytes'] / 2**30:.1f} GiB")
    print_goals(goals)
    if two:
        print_two_workers(two)


def print_goals(goals: list[dict[str, Any]]) -> None:
    print("goals (ratios measured in this run):")
    for g in goals:
        verdict = "PASS" if g["pass"] else f"MISS (over by {g['margin']:.3f})"
        print(f"  {g['name']:<48} {g['value']:>8.3f}  goal <= {g['goal_at_most']:<5} {verdict}")


def print_two_workers(two: dict[int, list[dict[str, Any]]]) -> None:
    measure = two[2][0]["memory"]
    print(f"peak memory per worker at 2 workers ({measure.replace('_', ' ')}):")
    for stage in (2, 3):
        per_rank = ", ".join(
            f"rank {r} {w['peak_bytes'] / 2**20:.1f} MiB (tensors held after the steps {w['live_tensor_bytes'] / 2**20:.1f} MiB)"
            for r, w in enumerate(two[stage])
        )
        print(f"  ZeRO-{stage}: {per_rank}")
    gather_ms = two[2][0]["rpo_loss_global"] - two[2][0]["rpo_loss_local"]
    print(f"  {'(no goal) gather share of the 2-worker ZeRO-2 step':<48} {gather_ms / two[2][0]['step_ms']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=64, help="image pixels; latents are resolution / 8")
    parser.add_argument("--batch", type=int, default=2, help="pairs per worker")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--unet", choices=["tiny", "sd15", "sdxl"], default="tiny",
                        help="tiny: the toy store's model; sd15/sdxl: a random UNet of that size on synthetic rows")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON result goes")
    parser.add_argument("--compile", action="store_true",
                        help="train.compile=inductor for our step (the warm-up steps absorb the compilation)")
    parser.add_argument("--lora-vs-plain", action="store_true",
                        help="only: our LoRA DPO step vs a plain diffusers + peft loop (tiny model, CPU); goal >= 1.3")
    parser.add_argument("--zero1-vs-zero2", action="store_true",
                        help="only: a full fine-tune step on one worker under ZeRO-1 vs ZeRO-2, and their weights")
    args = parser.parse_args()
    set_environment(args.device)
    if args.device == "cpu":
        # One thread, as a Ray Train CPU worker runs; on a shared machine several threads also make every parallel
        # region wait for whichever thread the OS has descheduled, and the timings swing by 10x.
        torch.set_num_threads(1)
    started = time.perf_counter()

    if args.unet == "tiny":
        data = load_rows(args)
        from pipeline.precompute import resolve_model_path

        model_path = resolve_model_path(bench_config(args))  # built by precompute; returned as is
    else:  # no Ray, no store: a tiny pipeline only lends its DDPM schedule
        from pipeline.models.tiny import build_tiny_sdxl

        data = synthetic_rows(args)
        model_path = full_size_model(args, str(build_tiny_sdxl(WORK / "tiny-schedule")))
    if args.lora_vs_plain:
        result = lora_vs_plain(args, data, model_path)
        out = write_comparison(args, "train_step_lora_vs_plain.json", result)
        print(f"LoRA DPO step, {args.batch} pairs, {args.resolution} px, {args.device}: ours {result['ours']:.1f} ms, "
              f"plain diffusers + peft loop {result['plain']:.1f} ms; plain / ours = {result['plain_over_ours']:.2f} "
              f"(goal >= {GOAL_LORA_SPEEDUP}); wrote {out}")
        return
    if args.zero1_vs_zero2:
        result = zero1_vs_zero2(args, data, model_path)
        out = write_comparison(args, "train_step_zero1_vs_zero2.json", result)
        print(f"full fine-tune RPO step, one worker, {args.batch} pairs, {args.resolution} px, {args.device}: ZeRO-1 "
              f"{result['zero1']:.1f} ms, ZeRO-2 {result['zero2']:.1f} ms; ZeRO-2 / ZeRO-1 = "
              f"{result['zero2_over_zero1']:.2f}; largest weight difference after {WARMUP + args.repeats} steps: "
              f"{result['max_weight_difference']:.3g}; wrote {out}")
        return
    one = time_one_process(args, data, model_path)
    two = time_two_workers(args, model_path) if args.unet == "tiny" else {}

    goals = [
        goal("RPO step / DPO step", one["step_rpo"] / one["step_dpo"], GOAL_RPO_OVER_DPO),
        goal("RPO step / bare UNet work", one["step_rpo"] / one["bare_unet_work"], GOAL_STEP_OVER_UNET),
    ]
    # The 2 workers run on the CPU with gloo (one GPU cannot hold two NCCL ranks): their gather time is a share of
    # a CPU step only; against a GPU step it would measure nothing.
    if two and args.device == "cpu":
        goals.append(goal("gather share: (global - local RPO loss) / step",
                          (two[2][0]["rpo_loss_global"] - two[2][0]["rpo_loss_local"]) / one["step_rpo"],
                          GOAL_GATHER_SHARE))
    device = torch.device(args.device)
    import deepspeed
    import diffusers

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "diffusers": diffusers.__version__,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "warmup": WARMUP,
        "one_process_ms": one,
        "two_workers": {f"zero{stage}": results for stage, results in two.items()},
        "goals": goals,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    header = (
        f"\n{args.unet} {data['kind']} UNet ({one['unet_parameters'] / 1e6:.2f}M parameters), {args.resolution} px -> latents "
        f"{one['latent_shape']}, {args.batch} pairs per worker, {one['precision']}, ZeRO-{one['zero_stage']} in one process, device {report['device_name']} "
        f"({device}), torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); medians of {args.repeats} repeats ({GATHER_REPEATS} for the losses)"
    )
    print_table(one, two, goals, header)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
