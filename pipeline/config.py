"""Typed configuration for a whole alignment run.

One nested dataclass tree, loaded from YAML, overridden by dotted ``--set key=value`` arguments, validated up
front, and round-tripped through a plain dict (that is how Ray workers receive it).

    cfg = load_config("jobs/configs/toy.yaml", overrides=["loss.beta=5000", "train.lr=1e-6"])
    cfg_dict = cfg.to_dict(); same = AlignConfig.from_dict(cfg_dict)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the key, the bad value and what is accepted."""


# --------------------------------------------------------------------------------------------- the parts


@dataclass
class DataConfig:
    # "toy" makes the synthetic toy world under <storage>/<name>/toy_world; anything else is a path to a
    # Pick-a-Pic Parquet file/folder or a JSONL file whose image paths are relative to its folder.
    source: str = "toy"
    toy_pairs: int = 256
    toy_resolution: int = 64
    toy_target_style: str = "sketch"
    toy_seed: int = 0
    drop_ties: bool = True
    max_image_pixels: int = 4096 * 4096  # larger decoded images are quarantined as decompression bombs
    max_aspect_ratio: float = 3.0  # winner/loser aspect ratios further apart than this are quarantined
    holdout_fraction: float = 0.125  # pairs kept apart (by pair_id hash) for evaluation


@dataclass
class ModelConfig:
    # "toy": a tiny SDXL-shaped pipeline whose VAE and UNet are fitted on the toy world until it draws its scenes in
    # every style (pipeline/train/toy_base.py; built once under <storage>/<name>/toy_base_*, 4-5 min on 2 cores, no
    # downloads). "tiny": the tiny pipeline with its UNet alone fitted (model.tiny_fit_steps), which denoises but
    # does not draw scenes: fast, for tests of the mechanics. Anything else is a hub id
    # (stabilityai/stable-diffusion-xl-base-1.0) or a local diffusers pipeline folder.
    pretrained: str = "toy"
    kind: Literal["auto", "sdxl", "sd15"] = "auto"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16"
    # For "tiny" only: steps fitting its UNet to the toy world (all styles alike) before anything uses it, so it
    # denoises its world; 0 keeps random weights (fast tests of the mechanics; preference training then cannot
    # learn, see pipeline/models/toy_fit.py).
    tiny_fit_steps: int = 400
    # OpenCLIP model for the similarity weights (and the clip scorer's default): "tiny" (the project's tiny OpenCLIP,
    # offline) or an open_clip model name (ViT-H-14).
    clip_model: str = "tiny"
    # Its weights: an open_clip pretrained tag (laion2b_s32b_b79k, openai) or a local weights file; "toy" (with
    # clip_model "tiny"): the tiny CLIP fitted on the toy world (pipeline/data/toy_clip.py; shipped with the project),
    # so RPO's similarity weights mean scene likeness as a real CLIP's do; "random": seeded random weights, for tests
    # of the mechanics only. Never random by default: a CLIP without weights is an error.
    clip_pretrained: str = "toy"


@dataclass
class PrecomputeConfig:
    store: str = ""  # feature store URI; "" means <storage>/<name>/features
    resolution: int = 64  # square training resolution in pixels (1024 for SDXL, 512 for SD1.5)
    batch_size: int = 8
    num_encoder_actors: int = 1
    actor_num_cpus: float = 0.5  # fractional so actors never starve Ray Data's read tasks on small nodes
    actor_num_gpus: float = 0.0  # 1.0 on a GPU cluster
    rows_per_shard: int = 512
    on_mismatch: Literal["error", "new_store"] = "error"


@dataclass
class LossConfig:
    objective: Literal["rpo", "dpo", "sft"] = "rpo"
    beta: float = 5000.0
    alpha: float = 0.5  # 1.0 weights by prompt similarity only
    tau: float = 0.1


@dataclass
class TrainConfig:
    mode: Literal["full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    max_steps: int = 80
    batch_size_per_worker: int = 8  # pairs per worker per micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-4  # the toy world's (bench/toy_alignment.py: at 1e-5 its samples do not move); SDXL: ~1e-8 x pairs
    lr_warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the device has it, else fp32
    # auto: 1 for LoRA (its gradients and Adam state are small; ZeRO-2's per-parameter gradient hooks cost more
    # than they save) and for full fine-tunes on one worker (nothing to partition), 2 for full fine-tunes on
    # several workers. 3 also partitions the weights (and the reference) across workers.
    zero_stage: Literal["auto", 1, 2, 3] = "auto"
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    # A torch.compile backend ("inductor") for the UNet, policy and reference, through DeepSpeed's engine.compile():
    # the first steps pay the compilation (minutes), later passes run fused kernels (bench/NOTES.md). None: eager.
    compile: str | None = None
    # More DeepSpeed config, merged over what the settings above imply (pipeline/train/deepspeed_config.py), for what
    # they do not name: e.g. --set train.deepspeed.zero_optimization.overlap_comm=true. Keys those settings decide
    # (batch sizes, accumulation, clipping, ZeRO stage, offload, precision, optimizer, schedule) are refused.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    prompt_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 40
    keep_checkpoints: int = 2
    log_every: int = 10  # each log line is a ray.train.report: a barrier through Ray Train's controller
    max_failures: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    worker_num_cpus: float = 1.0
    # Stores with at most this many training pairs are read once into Ray's object store, so later epochs do not
    # re-run the reader; bigger ones stream from the store every epoch.
    materialize_max_pairs: int = 4096
    # Start the policy (and the reference) from this diffusers UNet folder instead of the base pipeline's UNet:
    # re-alignment continues from the promoted model. Full fine-tunes only.
    init_unet: str | None = None
    # A Parquet file with a pair_id column: train on those of the store's train pairs only (re-alignment's mix of
    # new and old pairs). None: all of them.
    pair_ids: str | None = None
    # How global batches are composed. "random": shuffled pairs. "planned": the store's batch plan, built once per
    # store and global batch (pipeline/precompute/plan.py): each batch from one neighbourhood of the CLIP
    # embeddings, so RPO contrasts related pairs; the same batches in the same order every epoch and on resume.
    batches: Literal["random", "planned"] = "random"
    plan_batches_per_cluster: int = 4  # neighbourhood size of the plan, in global batches


@dataclass
class TuneConfig:
    name: str = "sweep"  # the sweep lives at <storage>/<name>/<tune.name>; the same command again resumes it
    # Draws of the random dimensions (choice/uniform/loguniform) per grid point; a space of grids alone runs each
    # point once. Trials = num_samples x the grid's points.
    num_samples: int = 1
    max_concurrent_trials: int = 1  # each trial is a driver (1 CPU) plus train.num_workers workers
    metric: str = "holdout_accuracy"  # a metric the training reports (README "Sweeps")
    mode: Literal["max", "min"] = "max"
    # Any config key -> [v1, v2] (a grid), {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}
    search_space: dict[str, Any] = field(default_factory=dict)
    scheduler: Literal["asha", "fifo"] = "asha"  # asha stops trials whose metric lags at its rungs; fifo never stops
    grace_period: int = 2  # optimizer steps before ASHA may stop a trial (its first rung)
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor of the trials at each rung


@dataclass
class GenerateConfig:
    # Prompts to generate: "" = the store's held-apart captions (up to num_prompts), plus a fixed list of toy scenes
    # when data.source is "toy"; else a .txt (one prompt a line), .jsonl or .parquet file with a "prompt" column.
    prompts: str = ""
    num_prompts: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every prompt is drawn once per seed, for every model
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    resolution: int = 0  # square output size in pixels; 0 = precompute.resolution
    # A diffusers scheduler class for sampling (e.g. "EulerDiscreteScheduler", "DDIMScheduler"); "" = the model's own.
    scheduler: str = ""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on GPUs, fp32 on CPU
    batch_size: int = 4  # prompts per pipeline call on one actor
    num_actors: int = 1
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0  # 1.0 on a GPU cluster


@dataclass
class ScorerConfig:
    # The published weights of a reward model: a local file or folder, or a hub id (README "Scorers" says where
    # each comes from). None for clip = model.clip_model / model.clip_pretrained.
    weights: str | None = None
    # What ships apart from the scorer's head (aesthetic: OpenAI CLIP ViT-L/14; pickscore: the processor, laion
    # CLIP-ViT-H-14's; imagereward: the BERT tokenizer folder); None = the published default.
    backbone: str | None = None
    # The architecture: None = the published one; tests name a tiny twin's config here.
    arch: str | None = None


@dataclass
class EvaluateConfig:
    holdout_pairs: int = 64  # held-apart pairs whose implicit accuracy training reports at its start and end
    every_steps: int = 0  # also report it every this many optimizer steps (0: start and end only); sweeps need it
    # Reward scorers run on every generated image: clip, pickscore, hpsv2, aesthetic, imagereward, style.
    scorers: list[str] = field(default_factory=lambda: ["style", "clip"])
    clip: ScorerConfig = field(default_factory=ScorerConfig)
    pickscore: ScorerConfig = field(default_factory=ScorerConfig)
    hpsv2: ScorerConfig = field(default_factory=ScorerConfig)
    aesthetic: ScorerConfig = field(default_factory=ScorerConfig)
    imagereward: ScorerConfig = field(default_factory=ScorerConfig)
    batch_size: int = 8  # images per scorer call on one actor
    num_actors: int = 1
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    confidence_level: float = 0.95  # of the bootstrap intervals
    bootstrap_resamples: int = 2000
    # Scorer -> the smallest difference a paired win counts (closer pairs are ties); unnamed scorers keep the
    # defaults of pipeline/evaluate/names.py TIE_MARGINS (about 1% of each scorer's spread).
    tie_margins: dict[str, float] = field(default_factory=dict)
    grid_prompts: int = 8  # prompts shown as base-vs-aligned image grids in the report


@dataclass
class RealignConfig:
    """Scheduled re-alignment (jobs/realign.py): the registry, the mix of pairs and the promotion gate."""

    registry: str = ""  # "" = <storage>/<name>/registry
    old_pairs_per_new: float = 1.0  # old pairs sampled (seeded) per new pair into a version's training set
    min_new_pairs: int = 1  # fewer new training pairs than this: the run does nothing and says so
    gate_scorer: str = "style"  # its paired win rate decides; must be one of evaluate.scorers
    min_win_rate_lower: float = 0.5  # the win-rate interval's lower end must be above this
    max_regression: float = 0.05  # no scorer's mean may be worse by more than this fraction of the promoted one's
    lock_stale_s: float = 86400.0  # a registry lock older than this is a crashed run's and is broken
    # With nothing promoted yet, promote the first version whatever the gate says (it is still judged against the
    # base and the verdict recorded): for a registry whose first model is trusted by construction.
    promote_first_version: bool = False


@dataclass
class ClusterConfig:
    storage_path: str = "runs"  # local folder or s3:// / gs:// URI; everything of a run lives under it
    ray_address: str | None = None  # None: Ray's own rules (RAY_ADDRESS, a running head, else a local Ray)
    # MLflow tracking URI (http://mlflow:5000, file:///path, databricks) for training metrics, experiment = name.
    # None: the MLFLOW_TRACKING_URI environment variable if set, else no MLflow. Needs mlflow (or mlflow-skinny).
    mlflow_tracking_uri: str | None = None


@dataclass
class AlignConfig:
    name: str = "toy"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AlignConfig":
        cfg = _build(cls, values, prefix="")
        validate(cfg)
        return cfg

    # Where each artefact of the run lives, derived in one place.
    @property
    def run_dir(self) -> str:
        return join_uri(self.cluster.storage_path, self.name)

    @property
    def store_uri(self) -> str:
        return self.precompute.store or join_uri(self.run_dir, "features")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (s3://bucket/x) without touching the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ---------------------------------------------------------------------------------------- dict -> dataclass


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = prefix or "<root>"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in '{where}'; accepted keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name in known & set(values):
        kwargs[name] = _coerce(hints[name], values[name], _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check (and gently convert) one value against its type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} fits none of {args}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # `name: 2024` means the name "2024"
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {hint!r}")  # a bug in this module, not user input


# ------------------------------------------------------------------------------------------- validation


def validate(cfg: AlignConfig) -> None:
    """Impossible values and combinations, caught before any work starts."""

    def need(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; accepted: {accepted}")

    need(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "a non-empty name without '/'")
    need(cfg.model.tiny_fit_steps >= 0, "model.tiny_fit_steps", cfg.model.tiny_fit_steps, "an integer >= 0")
    need(cfg.data.toy_pairs >= 2, "data.toy_pairs", cfg.data.toy_pairs, "an integer >= 2")
    need(cfg.data.toy_resolution >= 16, "data.toy_resolution", cfg.data.toy_resolution, "an integer >= 16")
    need(cfg.data.max_aspect_ratio >= 1.0, "data.max_aspect_ratio", cfg.data.max_aspect_ratio, "a number >= 1")
    need(0.0 <= cfg.data.holdout_fraction < 1.0, "data.holdout_fraction", cfg.data.holdout_fraction, "0 <= x < 1")
    res = cfg.precompute.resolution
    need(res >= 8 and res % 8 == 0, "precompute.resolution", res, "a positive multiple of 8 (the VAE downsamples by 8)")
    need(cfg.precompute.batch_size >= 1, "precompute.batch_size", cfg.precompute.batch_size, "an integer >= 1")
    need(cfg.precompute.num_encoder_actors >= 1, "precompute.num_encoder_actors", cfg.precompute.num_encoder_actors, ">= 1")
    need(cfg.precompute.actor_num_cpus > 0, "precompute.actor_num_cpus", cfg.precompute.actor_num_cpus, "> 0")
    need(cfg.precompute.actor_num_gpus >= 0, "precompute.actor_num_gpus", cfg.precompute.actor_num_gpus, ">= 0")
    need(cfg.precompute.rows_per_shard >= 1, "precompute.rows_per_shard", cfg.precompute.rows_per_shard, ">= 1")
    need(cfg.loss.beta > 0, "loss.beta", cfg.loss.beta, "a number > 0 (Diffusion-DPO uses 5000)")
    need(0.0 <= cfg.loss.alpha <= 1.0, "loss.alpha", cfg.loss.alpha, "a number in [0, 1]")
    need(cfg.loss.tau > 0, "loss.tau", cfg.loss.tau, "a number > 0")
    if cfg.model.pretrained == "toy" and cfg.model.kind == "sd15":
        raise ConfigError("config key 'model.kind': 'sd15' is not available for model.pretrained=toy (the toy base is "
                          "SDXL-shaped); set model.pretrained=tiny for a tiny SD1.5, or model.kind=auto")
    if cfg.model.clip_pretrained == "toy" and cfg.model.clip_model != "tiny":
        raise ConfigError(f"config key 'model.clip_pretrained': 'toy' is the toy world's fit of the tiny CLIP; set "
                          f"model.clip_model=tiny (now {cfg.model.clip_model!r}) or name its weights (an open_clip "
                          f"tag such as laion2b_s32b_b79k, or a weights file)")
    need(bool(cfg.model.clip_pretrained), "model.clip_pretrained", cfg.model.clip_pretrained,
         "an open_clip tag, a weights file, 'toy' (the tiny CLIP fitted on the toy world) or 'random'")
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1")
    need(t.batch_size_per_worker >= 1, "train.batch_size_per_worker", t.batch_size_per_worker, "an integer >= 1")
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    need(t.lr > 0, "train.lr", t.lr, "a number > 0")
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", t.lr_warmup_steps, ">= 0")
    need(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, ">= 0 (0 turns clipping off)")
    need(0.0 <= t.prompt_dropout < 1.0, "train.prompt_dropout", t.prompt_dropout, "0 <= x < 1")
    need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "an integer >= 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    need(t.num_workers >= 1, "train.num_workers", t.num_workers, "an integer >= 1")
    need(t.lora_rank >= 1, "train.lora_rank", t.lora_rank, "an integer >= 1")
    need(t.materialize_max_pairs >= 0, "train.materialize_max_pairs", t.materialize_max_pairs, "an integer >= 0")
    need(t.worker_num_cpus > 0, "train.worker_num_cpus", t.worker_num_cpus, "> 0")
    need(t.plan_batches_per_cluster >= 1, "train.plan_batches_per_cluster", t.plan_batches_per_cluster,
         "an integer >= 1")
    from pipeline.train.deepspeed_config import check_deepspeed_extra

    check_deepspeed_extra(t.deepspeed)
    if t.offload_optimizer and t.optimizer == "adafactor":
        raise ConfigError(
            "config keys 'train.offload_optimizer' and 'train.optimizer': DeepSpeed's CPU offload needs AdamW; "
            "set train.optimizer=adamw or train.offload_optimizer=false"
        )
    if t.precision in ("bf16", "fp16") and not t.use_gpu:
        raise ConfigError(
            f"config key 'train.precision': {t.precision!r} needs GPUs (train.use_gpu=true); use 'auto' or 'fp32' on CPU"
        )
    from pipeline.tune.space import check_search_space  # builds and validates the config of every value it names

    check_search_space(cfg)
    need(cfg.evaluate.every_steps >= 0, "evaluate.every_steps", cfg.evaluate.every_steps, "an integer >= 0")
    need(cfg.evaluate.holdout_pairs >= 0, "evaluate.holdout_pairs", cfg.evaluate.holdout_pairs, "an integer >= 0")
    g = cfg.generate
    need(g.num_prompts >= 1, "generate.num_prompts", g.num_prompts, "an integer >= 1")
    need(len(g.seeds) >= 1, "generate.seeds", g.seeds, "a non-empty list of integers")
    need(len(set(g.seeds)) == len(g.seeds), "generate.seeds", g.seeds, "distinct seeds")
    need(g.num_inference_steps >= 1, "generate.num_inference_steps", g.num_inference_steps, "an integer >= 1")
    need(g.guidance_scale >= 0, "generate.guidance_scale", g.guidance_scale, "a number >= 0 (<= 1 turns guidance off)")
    need(g.resolution == 0 or (g.resolution >= 8 and g.resolution % 8 == 0), "generate.resolution", g.resolution,
         "0 (= precompute.resolution) or a positive multiple of 8")
    need(g.batch_size >= 1, "generate.batch_size", g.batch_size, "an integer >= 1")
    need(g.num_actors >= 1, "generate.num_actors", g.num_actors, "an integer >= 1")
    need(g.actor_num_cpus > 0, "generate.actor_num_cpus", g.actor_num_cpus, "> 0")
    need(g.actor_num_gpus >= 0, "generate.actor_num_gpus", g.actor_num_gpus, ">= 0")
    if g.precision in ("bf16", "fp16") and g.actor_num_gpus == 0:
        raise ConfigError(
            f"config key 'generate.precision': {g.precision!r} needs GPUs (generate.actor_num_gpus > 0); "
            f"use 'auto' or 'fp32' on CPU"
        )
    e = cfg.evaluate
    from pipeline.evaluate.names import SCORER_NAMES  # the one list of scorers, kept beside them

    for i, name in enumerate(e.scorers):
        need(name in SCORER_NAMES, f"evaluate.scorers[{i}]", name, f"one of {list(SCORER_NAMES)}")
    need(len(set(e.scorers)) == len(e.scorers), "evaluate.scorers", e.scorers, "each scorer at most once")
    need(e.batch_size >= 1, "evaluate.batch_size", e.batch_size, "an integer >= 1")
    need(e.num_actors >= 1, "evaluate.num_actors", e.num_actors, "an integer >= 1")
    need(e.actor_num_cpus > 0, "evaluate.actor_num_cpus", e.actor_num_cpus, "> 0")
    need(e.actor_num_gpus >= 0, "evaluate.actor_num_gpus", e.actor_num_gpus, ">= 0")
    need(0.5 <= e.confidence_level < 1.0, "evaluate.confidence_level", e.confidence_level, "0.5 <= x < 1")
    need(e.bootstrap_resamples >= 100, "evaluate.bootstrap_resamples", e.bootstrap_resamples, "an integer >= 100")
    if "style" in e.scorers and not is_toy_world(cfg):
        raise ConfigError(
            f"config key 'evaluate.scorers': 'style' is the toy world's style scorer, and this run is not the toy world "
            f"(data.source={cfg.data.source!r}, model.pretrained={cfg.model.pretrained!r}): its scores would mean "
            f"nothing. Name real scorers, e.g. --set evaluate.scorers='[pickscore, hpsv2, clip]' with their weights "
            f"(evaluate.<scorer>.weights; README 'Scorers')")
    for name, margin in e.tie_margins.items():
        need(name in SCORER_NAMES, f"evaluate.tie_margins.{name}", name, f"one of {list(SCORER_NAMES)}")
        need(isinstance(margin, (int, float)) and not isinstance(margin, bool) and margin >= 0,
             f"evaluate.tie_margins.{name}", margin, "a number >= 0")
    need(e.grid_prompts >= 0, "evaluate.grid_prompts", e.grid_prompts, "an integer >= 0")
    need(cfg.tune.num_samples >= 1, "tune.num_samples", cfg.tune.num_samples, "an integer >= 1")
    need(bool(cfg.tune.name) and "/" not in cfg.tune.name, "tune.name", cfg.tune.name, "a non-empty name without '/'")
    need(cfg.tune.max_concurrent_trials >= 1, "tune.max_concurrent_trials", cfg.tune.max_concurrent_trials, ">= 1")
    need(cfg.tune.grace_period >= 1, "tune.grace_period", cfg.tune.grace_period, "an integer >= 1")
    need(cfg.tune.reduction_factor > 1, "tune.reduction_factor", cfg.tune.reduction_factor, "a number > 1")
    r = cfg.realign
    need(r.old_pairs_per_new >= 0, "realign.old_pairs_per_new", r.old_pairs_per_new, "a number >= 0")
    need(r.min_new_pairs >= 1, "realign.min_new_pairs", r.min_new_pairs, "an integer >= 1")
    need(0.0 <= r.min_win_rate_lower < 1.0, "realign.min_win_rate_lower", r.min_win_rate_lower, "0 <= x < 1")
    need(r.max_regression >= 0, "realign.max_regression", r.max_regression, "a number >= 0")
    need(r.lock_stale_s > 0, "realign.lock_stale_s", r.lock_stale_s, "a number of seconds > 0")
    if t.init_unet is not None and t.mode == "lora":
        raise ConfigError(
            "config keys 'train.init_unet' and 'train.mode': a LoRA run adapts the base pipeline's UNet; "
            "set train.mode=full to continue from another UNet, or unset train.init_unet"
        )


# Files the toy-world models carry (pipeline/train/toy_base.py, pipeline/models/toy_fit.py): a local pipeline folder
# with one of them is a toy model, whose images the style scorer can judge.
TOY_MODEL_MARKERS = ("toy_base.json", "toy_fit.json")


def is_toy_world(cfg: AlignConfig) -> bool:
    """Whether the run's data or model is the toy world's (the style scorer means something only there)."""
    if cfg.data.source == "toy" or cfg.model.pretrained in ("toy", "tiny"):
        return True
    folder = Path(cfg.model.pretrained).expanduser()
    return any((folder / marker).is_file() for marker in TOY_MODEL_MARKERS)


def _lookup(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key '{dotted}'")
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------- YAML + overrides


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-6' -> ('train.lr', 1e-6). The value is read as YAML, so numbers, booleans and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-6")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 also reads yes/no/on/off as booleans: `--set name=off` means the name "off". Only true/false are
    # booleans on the command line (bool keys accept yes/no/on/off as words, see _coerce).
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()
    # YAML 1.1 reads "1e-6" as a string; numbers are what a user means there.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deep_copy(values)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return out


def _deep_copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AlignConfig:
    """Defaults <- YAML file (if any) <- dotted overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; the shipped configs are in jobs/configs/")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    values = apply_overrides(values, overrides or [])
    return AlignConfig.from_dict(values)


def add_config_args(parser: Any) -> None:
    """The two arguments every job takes: a YAML config and dotted overrides."""
    parser.add_argument("--config", default=None, help="YAML config (see jobs/configs/); defaults apply without one")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=1e-6 (repeatable)",
    )


def config_from_args(args: Any) -> AlignConfig:
    return load_config(args.config, args.overrides)
