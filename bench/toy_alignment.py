"""Toy-world alignment: SFT, DPO and RPO (random and planned batches) from one base, judged on generated images.

    .venv/bin/python bench/toy_alignment.py            # the benchmark (see bench/README.md for its time)
    .venv/bin/python bench/toy_alignment.py --quick    # RPO only, one training seed, no sweep

One toy world (sketch preferred) and one feature store; from the same base (the toy base that generates,
`model.pretrained=toy`, built once under --work), every method trains with the same data, steps, batch size and lr,
once per training seed (the seed moves the data order and the noise draws), through the real pipeline
(`run_training`: Ray Train + DeepSpeed). RPO's similarity weights come from the tiny CLIP fitted on the toy world
(`--clip toy`, the shipped fit; `--clip random` gives it random weights). A small sweep adds, on the first
seed, beta for DPO and RPO, tau for RPO and beta for planned RPO. Then one `evaluate_models` call generates
held-apart prompts x fixed image seeds for the base and every trained model (paired: same prompts, seeds and initial
noise) and scores them with the toy style scorer. Printed and written to bench/results/toy_alignment.json (plot:
toy_alignment.png), per method: the share of samples in the target style and the mean target-style score (mean over
training seeds with a 95% t-interval; the base's interval is over its images), the paired win rate against the base,
the implicit accuracy on held-apart pairs, and the drift from the base (mean denoising MSE on held-apart images,
same noise for every model, minus the base's).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
METHODS = {  # name -> config overrides; every method also gets the shared settings
    "sft": ["loss.objective=sft"],
    "dpo": ["loss.objective=dpo"],
    "rpo": ["loss.objective=rpo"],
    "rpo-planned": ["loss.objective=rpo", "train.batches=planned"],
}
SWEEP = {  # extra variants, first training seed only
    "dpo beta=2000": ["loss.objective=dpo", "loss.beta=2000"],
    "rpo beta=20000": ["loss.objective=rpo", "loss.beta=20000"],
    "rpo tau=0.5": ["loss.objective=rpo", "loss.tau=0.5"],
    "rpo-planned beta=2000": ["loss.objective=rpo", "train.batches=planned", "loss.beta=2000"],
}
DRIFT_PAIRS = 32


def shared_settings(args) -> list[str]:
    res = args.resolution
    return [
        "data.source=toy", f"data.toy_pairs={args.pairs}", f"data.toy_resolution={res}", f"precompute.resolution={res}",
        "data.holdout_fraction=0.25", "precompute.batch_size=32",
        *([f"model.clip_pretrained={args.clip}"] if args.clip else []),
        "train.num_workers=1", f"train.batch_size_per_worker={args.batch}", f"train.max_steps={args.steps}",
        f"train.log_every={args.steps}", f"train.checkpoint_every={args.steps}", f"train.lr={args.lr}",
        "evaluate.holdout_pairs=64", "evaluate.scorers=[style]", f"generate.num_prompts={args.prompts}",
        f"generate.seeds={list(range(args.image_seeds))}", f"generate.num_inference_steps={args.inference_steps}",
        *([f"model.pretrained={args.base}"] if args.base else []), *args.set,
    ]


def train_all(args, storage: Path, store: str, base: str) -> dict[str, dict]:
    """{tag: {"method", "seed", "model", "metrics"}} for every method x seed and the sweep's variants, all from the
    pipeline folder ``base`` (built once: "tiny" would otherwise be built under each run's own folder)."""
    from pipeline.config import load_config
    from pipeline.train.run import run_training

    runs = [(m, METHODS[m], s) for s in args.seeds for m in args.methods]
    runs += [(m, o, args.seeds[0]) for m, o in (SWEEP.items() if args.sweep else [])]
    trained = {}
    for method, overrides, seed in runs:
        tag = f"{method.replace(' ', '_').replace('=', '')}_seed{seed}"
        cfg = load_config(None, [f"cluster.storage_path={storage}", f"name={tag}", f"precompute.store={store}",
                                 *shared_settings(args), f"model.pretrained={base}", *overrides, f"train.seed={seed}"])
        started = time.perf_counter()
        result = run_training(cfg)
        trained[tag] = {"method": method, "seed": seed, "model": result.model_uri, "metrics": result.metrics,
                        "seconds": round(time.perf_counter() - started, 1)}
        print(f"[bench] {tag}: holdout accuracy {result.metrics.get('holdout_accuracy', float('nan')):.3f} "
              f"({trained[tag]['seconds']} s)", flush=True)
    return trained


def denoising_drift(cfg, models: dict[str, str]) -> dict[str, float]:
    """Mean denoising MSE of each UNet on held-apart winners and losers (fixed noise and timesteps for all)."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipeline.precompute import read_training_dataset, resolve_model_path
    from pipeline.train import noise as noise_draws
    from pipeline.train.step import unet_mse

    rows = read_training_dataset(cfg.store_uri, split="holdout").take_batch(DRIFT_PAIRS, batch_format="numpy")
    latents = torch.as_tensor(np.concatenate([rows["latents_w"], rows["latents_l"]])).float()
    ids = [f"{p}/{side}" for side in ("w", "l") for p in rows["pair_id"]]
    prompt = torch.as_tensor(np.concatenate([rows["prompt_embeds"]] * 2)).float()
    pooled = torch.as_tensor(np.concatenate([rows["pooled_prompt_embeds"]] * 2)).float()
    time_ids = torch.as_tensor(np.concatenate([rows["add_time_ids_w"], rows["add_time_ids_l"]])).float()
    base = resolve_model_path(cfg)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    draws = noise_draws.draw_for_batch(ids, latents, seed=12345, step=0, micro_step=0,
                                       num_train_timesteps=scheduler.config.num_train_timesteps, prompt_dropout=0.0)
    out = {}
    for tag, location in models.items():
        unet = (UNet2DConditionModel.from_pretrained(base, subfolder="unet") if location == "base"
                else UNet2DConditionModel.from_pretrained(location)).eval()
        with torch.no_grad():
            out[tag] = float(unet_mse(unet, scheduler, latents, draws.noise, draws.timesteps, prompt, pooled,
                                      time_ids).mean())
    return out


def seed_interval(values: list[float], *, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and 95% t-interval over training seeds (no interval from one seed), clipped to ``bounds`` (a share or a
    rate cannot leave [0, 1], where a t-interval over few seeds can)."""
    import numpy as np
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return {"value": mean, "ci": [None, None], "n": len(values)}
    spread = stats.sem(values)
    if spread == 0:  # every seed gave the same value
        return {"value": mean, "ci": [mean, mean], "n": len(values)}
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=spread)
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"value": mean, "ci": [float(low), float(high)], "n": len(values)}


def summarise(trained: dict, comparison: dict, drift: dict) -> list[dict]:
    """One row per method (over its seeds) and one per sweep variant, plus the base."""
    style = comparison["scorers"]["style"]
    share = comparison["style"]["share"]
    rows = [{"method": "base", "style_share": {"value": share["base"]["value"], "ci": share["base"]["ci"]},
             "style_score": {"value": style["mean"]["base"], "ci": style["mean_ci"]["base"]},
             "win_rate_vs_base": None, "holdout_accuracy": None, "drift": 0.0}]
    by_method: dict[str, list[str]] = {}
    for tag, run in trained.items():
        by_method.setdefault(run["method"], []).append(tag)
    for method, tags in by_method.items():
        rows.append({
            "method": method, "seeds": [trained[t]["seed"] for t in tags],
            "style_share": seed_interval([share[t]["value"] for t in tags], bounds=(0.0, 1.0)),
            "style_score": seed_interval([style["mean"][t] for t in tags], bounds=(0.0, 1.0)),
            "win_rate_vs_base": seed_interval([style["win_rate"][t]["value"] for t in tags], bounds=(0.0, 1.0)),
            # SFT trains without a reference, so its implicit rewards (policy vs reference) are not measured
            "holdout_accuracy": None if method == "sft" else seed_interval(
                [trained[t]["metrics"].get("holdout_accuracy", float("nan")) for t in tags], bounds=(0.0, 1.0)),
            "drift": seed_interval([drift[t] - drift["base"] for t in tags]),
        })
    return rows


def _cell(entry) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, float):
        return f"{entry:+.4f}"
    low, high = entry.get("ci", [None, None])
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
    return f"{entry['value']:.3f}{interval}"


def print_table(rows: list[dict]) -> None:
    header = ["method", "target-style share", "mean style score", "win rate vs base", "holdout acc.", "drift (MSE)"]
    print(" | ".join(header))
    for r in rows:
        drift = r["drift"] if isinstance(r["drift"], float) else r["drift"]["value"]
        print(" | ".join([r["method"], _cell(r["style_share"]), _cell(r["style_score"]), _cell(r["win_rate_vs_base"]),
                          _cell(r["holdout_accuracy"]), f"{drift:+.4f}"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    values = [r["style_share"]["value"] for r in rows]
    errors = [[v - (r["style_share"]["ci"][0] if r["style_share"]["ci"][0] is not None else v) for v, r in zip(values, rows)],
              [(r["style_share"]["ci"][1] if r["style_share"]["ci"][1] is not None else v) - v for v, r in zip(values, rows)]]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    ax.bar(names, values, yerr=errors, capsize=4, color=["grey"] + ["C0"] * (len(rows) - 1))
    ax.set_ylabel("share of samples in the target style")
    ax.set_title("toy world: generated images, 95% intervals")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=384)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--image-seeds", type=int, default=3)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--base", default="", help="model.pretrained: a diffusers pipeline folder, 'tiny', ...; default: "
                        "the config's, the toy base (pipeline.train.toy_base, built once under --work)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--clip", default="toy", help="model.clip_pretrained: 'toy' (the tiny CLIP fitted on the toy "
                        "world, so RPO's weights mean scene likeness), or 'random' (the tiny CLIP's random weights)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quick", action="store_true", help="RPO only, one training seed, no sweep")
    parser.add_argument("--work", type=Path, default=RESULTS / "work" / "toy_alignment")
    parser.add_argument("--out", type=Path, default=RESULTS / "toy_alignment.json")
    args = parser.parse_args()
    if args.quick:
        args.methods, args.seeds, args.sweep = ["rpo"], [0], False
        args.prompts = 8

    from pipeline.cli import init_ray
    from pipeline.config import load_config
    from pipeline.evaluate.run import evaluate_models
    from pipeline.precompute import resolve_model_path, run_precompute

    started = time.perf_counter()
    storage = args.work.resolve()
    cfg = load_config(None, [f"cluster.storage_path={storage}", "name=world", *shared_settings(args)])
    init_ray(cfg)
    store = run_precompute(cfg)["store_uri"]
    trained = train_all(args, storage, store, resolve_model_path(cfg))
    models = {"base": "base"} | {tag: run["model"] for tag, run in trained.items()}
    judged = evaluate_models(cfg, models, out_dir=str(storage / "evaluation"), baseline="base")
    drift = denoising_drift(cfg, models)
    rows = summarise(trained, judged.comparison, drift)
    print_table(rows)
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
              "runs": {tag: {k: v for k, v in run.items() if k != "model"} for tag, run in trained.items()},
              "report": judged.report_path, "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({record['seconds']} s); report: {judged.report_path}")


if __name__ == "__main__":
    main()
