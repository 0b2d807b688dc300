"""Generation as Ray Data batch inference: fixed prompts x seeds, for every model, paired by their starting noise.

    result = run_generation(cfg, {"base": "base", "aligned": "runs/toy/model"}, out_dir="runs/toy/generate")

Each actor of the pool loads the base pipeline once (and each model variant once, on first use). Every image starts
from noise drawn on the CPU from its seed alone, so the same (prompt, seed) starts from the same latents for every
model, on any device and in any batch; stochastic samplers draw from the same per-image generator too. Output:
``<out_dir>/<tag>/<prompt_id>_s<seed>.png`` and ``<out_dir>/index.parquet`` (prompt, seed, model tag, file,
settings). A re-run with the same prompts, settings and model files reuses the images; anything else regenerates.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AlignConfig, join_uri
from pipeline.generate.models import ModelSpec, check_scheduler, load_base, resolve_model, with_model
from pipeline.generate.prompts import prompt_set
from pipeline.storage import filesystem, read_text, write_text

INDEX_NAME = "index.parquet"
SETTINGS_NAME = "settings.json"
INDEX_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("prompt_id", pa.int64()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("file", pa.string()),  # relative to the generation folder
    ("resolution", pa.int64()),
    ("num_inference_steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("model_source", pa.string()),
])


@dataclass
class GenerationResult:
    out_dir: str
    index_uri: str
    index: pa.Table
    reused: bool  # True when a previous run's images matched and nothing was generated


def generation_settings(cfg: AlignConfig) -> dict[str, Any]:
    g = cfg.generate
    return {
        "resolution": g.resolution or cfg.precompute.resolution,
        "num_inference_steps": g.num_inference_steps,
        "guidance_scale": g.guidance_scale,
        "scheduler": g.scheduler,
        "precision": g.precision,
    }


def image_file(tag: str, prompt_id: int, seed: int) -> str:
    return f"{tag}/{prompt_id:05d}_s{seed}.png"


def initial_latents(seed: int, shape: tuple[int, ...]):
    """The starting noise of one image: a function of its seed alone (drawn on the CPU, so every device agrees)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32), generator


def _dtype(precision: str, on_gpu: bool):
    import torch

    if precision == "auto":
        return torch.float16 if on_gpu else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class GenerateImages:
    """Ray Data callable class: one batch of (model, prompt, seed) rows -> PNG files + index rows."""

    def __init__(self, models: dict[str, dict], settings: dict[str, Any], out_dir: str):
        import torch

        self.specs = {tag: ModelSpec(**spec) for tag, spec in models.items()}
        self.settings = settings
        self.out_dir = out_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _dtype(settings["precision"], self.device.type == "cuda")
        self.bases: dict[tuple, Any] = {}  # (base pipeline path, revision, variant) -> pipeline, loaded once
        self.pipelines: dict[str, Any] = {}  # model tag -> pipeline, built on first use

    def _pipeline(self, tag: str):
        if tag not in self.pipelines:
            spec = self.specs[tag]
            key = (spec.base, spec.revision, spec.variant)
            if key not in self.bases:
                self.bases[key] = load_base(spec.base, revision=spec.revision, variant=spec.variant,
                                            dtype=self.dtype, device=self.device, scheduler=self.settings["scheduler"])
            self.pipelines[tag] = with_model(self.bases[key], spec)
        return self.pipelines[tag]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
        tags = batch["model"]
        for tag in sorted(set(tags.tolist())):  # batches are planned per model; this also handles mixed ones
            picked = np.flatnonzero((tags == tag) & ~batch["pad"])
            if len(picked) == 0:
                continue
            pipe = self._pipeline(tag)
            size = self.settings["resolution"]
            shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
            draws = [initial_latents(int(batch["seed"][i]), shape) for i in picked]
            with torch.no_grad():
                images = pipe(
                    prompt=[str(batch["prompt"][i]) for i in picked],
                    height=size,
                    width=size,
                    num_inference_steps=self.settings["num_inference_steps"],
                    guidance_scale=self.settings["guidance_scale"],
                    latents=torch.stack([latents for latents, _ in draws]).to(self.device, self.dtype),
                    generator=[generator for _, generator in draws],
                ).images
            for i, image in zip(picked, images):
                relative = image_file(tag, int(batch["prompt_id"][i]), int(batch["seed"][i]))
                _write_png(join_uri(self.out_dir, relative), image)
                rows["model"].append(tag)
                rows["prompt_id"].append(int(batch["prompt_id"][i]))
                rows["prompt"].append(str(batch["prompt"][i]))
                rows["seed"].append(int(batch["seed"][i]))
                rows["file"].append(relative)
                rows["resolution"].append(size)
                rows["num_inference_steps"].append(self.settings["num_inference_steps"])
                rows["guidance_scale"].append(float(self.settings["guidance_scale"]))
                rows["scheduler"].append(self.settings["scheduler"] or type(pipe.scheduler).__name__)
                rows["model_source"].append(self.specs[tag].path)
        return {name: np.array(values) for name, values in rows.items()}


def _write_png(uri: str, image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # PIL's PNG encoder is deterministic: same pixels, same bytes
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(buffer.getvalue())


def work_rows(prompts: list[str], seeds: list[int], tags: list[str]) -> list[list[dict[str, Any]]]:
    """The (model, prompt, seed) rows, one list per model: prompt-major, then seed."""
    return [
        [{"model": tag, "prompt_id": pid, "prompt": prompt, "seed": seed}
         for pid, prompt in enumerate(prompts) for seed in seeds]
        for tag in tags
    ]


def planned_blocks(per_model: list[list[dict[str, Any]]], batch_size: int) -> list[pa.Table]:
    """Blocks of exactly ``batch_size`` rows of one model each, a short last block padded with rows the actor skips.

    Ray Data bundles blocks until a bundle holds ``batch_size`` rows, so an unpadded short block would be merged with
    the next model's rows and split differently from run to run; with full blocks every pipeline call sees the same
    prompts in every run, which is what makes a run's bytes repeat on any device.
    """
    blocks = []
    for rows in per_model:
        for start in range(0, len(rows), batch_size):
            chunk = [dict(row, pad=False) for row in rows[start:start + batch_size]]
            chunk += [dict(chunk[-1], pad=True)] * (batch_size - len(chunk))
            blocks.append(pa.Table.from_pylist(chunk))
    return blocks


def model_specs(cfg: AlignConfig, models: dict[str, str]) -> dict[str, ModelSpec]:
    """Every model's spec; the run's base model is loaded at model.revision / model.variant, as precompute and
    training load it (``base_weights``)."""
    from pipeline.precompute import resolve_model_path
    from pipeline.precompute.run import base_weights

    base = resolve_model_path(cfg)
    return {tag: resolve_model(tag, location, base, **base_weights(cfg)) for tag, location in models.items()}


def run_generation(cfg: AlignConfig, models: dict[str, str], *, out_dir: str) -> GenerationResult:
    """Generate cfg's prompt set x generate.seeds for every model (tag -> location, see pipeline.generate.models)."""
    import ray

    g = cfg.generate
    check_scheduler(g.scheduler)
    prompts = prompt_set(cfg)  # a bad prompt file stops here, before any model loads
    specs = model_specs(cfg, models)
    settings = generation_settings(cfg)
    record = {"prompts": prompts, "seeds": list(g.seeds), "settings": settings,
              "models": {tag: spec.to_dict() for tag, spec in specs.items()}}
    index_uri = join_uri(out_dir, INDEX_NAME)
    previous = _read_json(join_uri(out_dir, SETTINGS_NAME))
    if previous == record:
        return GenerationResult(out_dir, index_uri, pq.read_table(_local_or_uri(index_uri)[1],
                                                                   filesystem=_local_or_uri(index_uri)[0]), True)

    blocks = planned_blocks(work_rows(prompts, list(g.seeds), list(specs)), g.batch_size)
    generated = ray.data.from_arrow(blocks).map_batches(
        GenerateImages,
        fn_constructor_kwargs={"models": record["models"], "settings": settings, "out_dir": out_dir},
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        batch_size=g.batch_size,
        batch_format="numpy",
        num_cpus=g.actor_num_cpus,
        num_gpus=g.actor_num_gpus,
    )
    index = pa.Table.from_pylist(generated.take_all(), schema=INDEX_SCHEMA)
    index = index.sort_by([("model", "ascending"), ("prompt_id", "ascending"), ("seed", "ascending")])
    fs, path = _local_or_uri(index_uri)
    pq.write_table(index, path, filesystem=fs)
    write_text(join_uri(out_dir, SETTINGS_NAME), json.dumps(record, indent=1))  # last: marks the set complete
    return GenerationResult(out_dir, index_uri, index, False)


def _local_or_uri(uri: str):
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return fs, path


def _read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except (FileNotFoundError, OSError, ValueError):
        return None
