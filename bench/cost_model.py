"""What a Diffusion-RPO training step costs on paper: counted FLOPs, memory per GPU, floor time, GPU-hours.

    .venv/bin/python bench/cost_model.py            # CPU, ~1 min: prints a table, writes bench/results/cost_model.json

FLOPs are counted, not estimated: torch's `FlopCounterMode` runs the real SDXL and SD1.5 UNet architectures
(diffusers' `UNet2DConditionModel` from the published configs, pipeline/models/architectures.py) on the meta device,
so no weights and no arithmetic, only shapes. One step per pair = policy forward + backward over the stacked
[winner; loser] batch (2 images) + the frozen reference's forward over the same 2 images, which is what
`pipeline.train.step` runs. The loss (B x B weights) and the optimizer are left out: a millisecond and a memory-bound
pass (README, Benchmarks).
These are model FLOPs: the forward that gradient checkpointing recomputes is not counted, as MFU is usually defined.

Memory per GPU follows DeepSpeed's bf16 ZeRO accounting (checked against the measured H200 peaks, bench/NOTES.md),
activations from the tensors autograd saves for backward in the same meta forward (attention counted as a fused
kernel saves it: q, k, v, output and a log-sum-exp row, not the S x S matrix the meta device's math path makes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.architectures import PUBLISHED_PARAMETERS as PUBLISHED_BY_COMPONENT
from pipeline.models.architectures import UNET_CONFIGS, build_on_meta
from pipeline.train.memory import zero_memory_per_gpu  # the one memory model (the preflight uses it too)

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "cost_model.json"
GiB = 2**30

# Peak dense bf16 tensor-core FLOP/s (no sparsity), SXM parts: NVIDIA's H100 datasheet lists "BF16 Tensor Core
# 1,979 teraFLOPS" with sparsity for H100 SXM, the H200 datasheet the same 1,979 for H200 SXM (same GH100 chip and
# clocks; the H200 adds HBM3e, 141 GB, 4.8 TB/s); dense is half. The project's H200 measured 788 TFLOP/s on an
# 8192^3 bf16 matmul through PyTorch (/work/.library/device/KINDS.md), ~80% of this peak: 45% MFU is ~57% of that.
PEAK_BF16_DENSE = {"H100 SXM": 989.4e12, "H200 SXM": 989.4e12}
GOAL_MFU = 0.45
PAPER_PAIRS_PER_STEP = 2048  # Diffusion-RPO / Diffusion-DPO's SDXL setting: effective batch 2048 pairs
PAPER_STEPS = 2000

# The published SDXL and SD1.5 UNet configs and parameter counts live in pipeline/models/architectures.py (one source
# for this model and the preflight's model check).
PUBLISHED_PARAMETERS = {kind: counts["unet"] for kind, counts in PUBLISHED_BY_COMPONENT.items()}
RESOLUTION = {"sdxl": 1024, "sd15": 512}
POOLED_DIM = 1280  # SDXL's text_embeds (OpenCLIP bigG pooled); time_ids add 6 x 256


def build_meta_unet(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16):
    # Built in the dtype: no cast (diffusers warns about casting after loading).
    return build_on_meta(config, "unet", dtype=dtype)


def unet_inputs(unet, images: int, latent: int, dtype: torch.dtype = torch.bfloat16) -> tuple[tuple, dict]:
    """Inputs of one UNet call over `images` latents of latent x latent, on the UNet's device."""
    cfg, device = unet.config, unet.device
    sample = torch.randn(images, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    timesteps = torch.zeros(images, dtype=torch.long, device=device)
    text = torch.randn(images, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(images, pooled, device=device, dtype=dtype),
                 "time_ids": torch.zeros(images, 6, device=device, dtype=dtype)}
    return (sample, timesteps), {"encoder_hidden_states": text, "added_cond_kwargs": added}


# ------------------------------------------------------------------------------------------------- FLOPs


@dataclass
class StepFlops:
    """FLOPs of one training step for `pairs` pairs (2 images each), counted by torch's FlopCounterMode."""

    pairs: int
    policy_forward: int
    policy_backward: int
    reference_forward: int

    @property
    def total(self) -> int:
        return self.policy_forward + self.policy_backward + self.reference_forward

    @property
    def per_pair(self) -> float:
        return self.total / self.pairs


def _counted(work: Callable[[], Any]) -> tuple[Any, int]:
    with FlopCounterMode(display=False) as counter:
        result = work()
    return result, counter.get_total_flops()


def forward_flops_by_module(unet, *, latent: int, images: int) -> dict[str, int]:
    """FLOPs of one forward per module path ("UNet2DConditionModel.conv_in", ...), summed over operators."""
    args, kwargs = unet_inputs(unet, images, latent, dtype=next(unet.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs)
    return {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}


def count_step_flops(unet, *, latent: int, pairs: int = 1) -> StepFlops:
    """Policy forward and backward over 2 x pairs images, then the reference forward over the same images."""
    args, kwargs = unet_inputs(unet, 2 * pairs, latent, dtype=next(unet.parameters()).dtype)
    unet.requires_grad_(True)
    out, forward = _counted(lambda: unet(*args, **kwargs).sample)
    _, backward = _counted(lambda: out.float().pow(2).mean().backward())
    with torch.no_grad():
        _, reference = _counted(lambda: unet(*args, **kwargs).sample)
    unet.zero_grad(set_to_none=True)
    return StepFlops(pairs, forward, backward, reference)


# ------------------------------------------------------------------------------------------- activations


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that saves what flash/memory-efficient kernels save (q, k, v, out and a
    float32 log-sum-exp per query row), not the S x S probabilities of the math path. Forward only."""

    @staticmethod
    def forward(ctx, q, k, v, sdpa, kwargs):
        with torch.no_grad():
            out = sdpa(q, k, v, **kwargs)
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only the saved tensors are measured
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = (
        lambda q, k, v, **kwargs: _FusedAttention.apply(q, k, v, sdpa, kwargs))
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def saved_activation_bytes(unet, *, latent: int, images: int) -> dict[str, int]:
    """Bytes autograd keeps for backward in one forward over `images` latents, without and with gradient
    checkpointing (diffusers checkpoints every ResnetBlock2D and BasicTransformerBlock: then a block keeps only its
    inputs, and backward recomputes one block at a time, so the largest block's own activations come back once)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    kept: list[torch.Tensor] = []  # holds the saved tensors so their storages stay distinct
    outside: dict[int, int] = {}  # storage -> bytes, saved outside any checkpointed block
    inside: dict[int, dict[int, int]] = {}  # block call -> its saved storages
    inputs: dict[int, int] = {}  # storages of the checkpointed blocks' inputs
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            kept.append(t)
            (inside[current[-1]] if current else outside)[key] = t.untyped_storage().nbytes()
        return t

    def enter(module, args, kwargs):
        current.append(len(inside))
        inside[current[-1]] = {}
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                inputs[a.untyped_storage()._cdata] = a.untyped_storage().nbytes()

    def leave(module, args, kwargs, output):
        current.pop()

    handles = [m.register_forward_pre_hook(enter, with_kwargs=True) for m in unet.modules()
               if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    handles += [m.register_forward_hook(leave, with_kwargs=True) for m in unet.modules()
                if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    args, kwargs = unet_inputs(unet, images, latent, dtype=next(unet.parameters()).dtype)
    unet.requires_grad_(True)
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    everything = dict(outside)
    for block in inside.values():
        everything.update(block)
    return {
        "plain": sum(everything.values()),
        "checkpointed": sum(outside.values()) + sum(inputs.values()) + max(
            (sum(b.values()) for b in inside.values()), default=0),
    }


# ---------------------------------------------------------------------------------------------- derived


def floor_step_seconds(flops: float, peak: float) -> float:
    return flops / peak


def mfu(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak


def gpu_hours(flops_per_pair: float, *, pairs: int, at_mfu: float, peak: float) -> float:
    return flops_per_pair * pairs / (at_mfu * peak) / 3600


def measured_steps(unet: str) -> list[dict[str, Any]]:
    """The committed one-process step measurements of that UNet (bench/train_step.py --unet, on GPUs)."""
    found = []
    for path in sorted(RESULTS.glob(f"train_step_{unet}_*.json")):
        report = json.loads(path.read_text())
        one = report["one_process_ms"]
        found.append({"file": path.name, "device_name": report["device_name"], "pairs": report["arguments"]["batch"],
                      "resolution": report["arguments"]["resolution"], "step_rpo_s": one["step_rpo"] / 1e3,
                      "bare_unet_work_s": one["bare_unet_work"] / 1e3})
    return found


# --------------------------------------------------------------------------------------------------- run


def model_costs(name: str, *, resolution: int, gpus: tuple[int, ...]) -> dict[str, Any]:
    unet = build_meta_unet(UNET_CONFIGS[name])
    params = sum(p.numel() for p in unet.parameters())
    latent = resolution // 8
    flops = count_step_flops(unet, latent=latent, pairs=1)
    act_one_image = saved_activation_bytes(unet, latent=latent, images=1)
    peak = PEAK_BF16_DENSE["H200 SXM"]
    memory = {}
    for pairs in (1, 2, 4, 8):
        for checkpointing in (False, True):
            activations = 2 * pairs * act_one_image["checkpointed" if checkpointing else "plain"]
            for stage in (2, 3):
                for n in gpus:
                    key = f"zero{stage}_gpus{n}_pairs{pairs}_{'gc' if checkpointing else 'nogc'}"
                    memory[key] = zero_memory_per_gpu(params, stage=stage, gpus=n, activations=activations)["total"]
    measured = []
    for m in measured_steps(name):
        if m["resolution"] != resolution:
            continue
        step_flops = flops.per_pair * m["pairs"]
        measured.append({**m, "mfu": mfu(step_flops, m["step_rpo_s"], peak),
                         "bare_unet_work_mfu": mfu(step_flops, m["bare_unet_work_s"], peak)})
    best = max((m["mfu"] for m in measured), default=None)
    paper_pairs = PAPER_PAIRS_PER_STEP * PAPER_STEPS
    return {
        "unet": name, "resolution": resolution, "latent": latent, "parameters": params,
        "published_parameters": PUBLISHED_PARAMETERS[name],
        "flops_per_pair": flops.per_pair,
        "flops_per_pair_parts": {"policy_forward": flops.policy_forward, "policy_backward": flops.policy_backward,
                                 "reference_forward": flops.reference_forward},
        "activation_bytes_per_image": act_one_image,
        "memory_per_gpu_bytes": memory,
        "floor_step_s_per_pair": {gpu: floor_step_seconds(flops.per_pair, p) for gpu, p in PEAK_BF16_DENSE.items()},
        "measured": measured,
        "paper_setting": {
            "pairs": paper_pairs,
            "gpu_hours_at_goal_mfu": gpu_hours(flops.per_pair, pairs=paper_pairs, at_mfu=GOAL_MFU, peak=peak),
            "gpu_hours_at_best_measured_mfu": (gpu_hours(flops.per_pair, pairs=paper_pairs, at_mfu=best, peak=peak)
                                               if best else None),
            "best_measured_mfu": best,
        },
    }


def print_report(costs: list[dict[str, Any]], gpus: tuple[int, ...]) -> None:
    for c in costs:
        f = c["flops_per_pair_parts"]
        print(f"\n{c['unet']} UNet, {c['parameters'] / 1e9:.3f}B parameters (published {c['published_parameters'] / 1e9:.3f}B), "
              f"{c['resolution']} px (latent {c['latent']}x{c['latent']})")
        print(f"  FLOPs per pair: {c['flops_per_pair'] / 1e12:.2f} TFLOP = policy forward {f['policy_forward'] / 1e12:.2f}"
              f" + backward {f['policy_backward'] / 1e12:.2f} + reference forward {f['reference_forward'] / 1e12:.2f}")
        a = c["activation_bytes_per_image"]
        print(f"  activations saved per image (bf16): {a['plain'] / GiB:.2f} GiB, "
              f"{a['checkpointed'] / GiB:.2f} GiB with gradient checkpointing")
        for gpu, s in c["floor_step_s_per_pair"].items():
            print(f"  floor step time on an {gpu} at {PEAK_BF16_DENSE[gpu] / 1e12:.0f} TFLOP/s: {s * 1e3:.0f} ms per pair")
        print("  memory per GPU (GiB), ZeRO-2 | ZeRO-3, at " + ", ".join(f"{n} GPU" for n in gpus) + ":")
        for pairs in (1, 2, 4, 8):
            for gc in ("nogc", "gc"):
                cells = []
                for stage in (2, 3):
                    cells.append(" ".join(f"{c['memory_per_gpu_bytes'][f'zero{stage}_gpus{n}_pairs{pairs}_{gc}'] / GiB:6.1f}"
                                          for n in gpus))
                label = f"{pairs} pair(s)/GPU{', checkpointed' if gc == 'gc' else ''}"
                print(f"    {label:<28} {cells[0]}  | {cells[1]}")
        for m in c["measured"]:
            print(f"  measured {m['file']} ({m['device_name']}, {m['pairs']} pair(s)): step {m['step_rpo_s'] * 1e3:.0f} ms"
                  f" -> MFU {m['mfu']:.1%} (bare UNet work {m['bare_unet_work_mfu']:.1%})")
        p = c["paper_setting"]
        best = (f"{p['gpu_hours_at_best_measured_mfu']:.0f} GPU-hours at the best measured MFU {p['best_measured_mfu']:.1%}, "
                if p["best_measured_mfu"] else "")
        print(f"  paper setting ({PAPER_PAIRS_PER_STEP} pairs x {PAPER_STEPS} steps = {p['pairs'] / 1e6:.2f}M pairs): "
              f"{best}{p['gpu_hours_at_goal_mfu']:.0f} GPU-hours at {GOAL_MFU:.0%} (H200)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="data-parallel GPU counts for memory")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    gpus = tuple(args.gpus)
    costs = [model_costs(name, resolution=RESOLUTION[name], gpus=gpus) for name in ("sdxl", "sd15")]
    print_report(costs, gpus)
    report = {"peak_bf16_dense_flops": PEAK_BF16_DENSE, "goal_mfu": GOAL_MFU, "gpus": list(gpus),
              "paper": {"pairs_per_step": PAPER_PAIRS_PER_STEP, "steps": PAPER_STEPS}, "models": costs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
