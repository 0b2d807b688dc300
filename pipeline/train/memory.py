"""How much GPU memory one training worker needs: the bf16 DeepSpeed ZeRO model of bench/cost_model.py.

Pure arithmetic over the parameter count and the activations autograd keeps. The activations per image were measured
by `bench/cost_model.py` (saved-tensor hooks over a meta-device forward of the published UNets, fused attention;
`bench/results/cost_model.json`; a test keeps these constants equal to that file) and scale with the latent's area.
Checked against H200 peaks (bench/NOTES.md): 1 pair predicted 66.3 GiB, measured 67.3; 4 pairs predicted 107.2,
measured 100.8.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# kind -> (resolution measured at, bytes kept per image without / with gradient checkpointing), bf16
ACTIVATION_BYTES_PER_IMAGE = {
    "sdxl": (1024, 7_308_337_024, 732_471_936),
    "sd15": (512, 982_924_800, 232_945_664),
}
REDUCE_BUCKET_ELEMENTS = 50_000_000  # pipeline.train.deepspeed_config caps DeepSpeed's buckets here
CUDA_CONTEXT_BYTES = 1 * GIB  # the CUDA context, cuBLAS workspaces and the allocator's slack


@dataclass(frozen=True)
class WorkerMemory:
    parts: dict[str, float]  # bytes per part
    total: float  # bytes at the step's peak


def activation_bytes(kind: str, *, resolution: int, images: int, checkpointing: bool) -> float:
    measured_at, plain, checkpointed = ACTIVATION_BYTES_PER_IMAGE[kind]
    return images * (checkpointed if checkpointing else plain) * (resolution / measured_at) ** 2


def zero_memory_per_gpu(params: int, *, stage: int, gpus: int, activations: float, reference: bool = True,
                        trainable: int | None = None, offload_optimizer: bool = False,
                        bucket_elements: int = REDUCE_BUCKET_ELEMENTS, cuda_context: float = 0.0) -> dict[str, float]:
    """Bytes per GPU of bf16 training with torch AdamW under DeepSpeed ZeRO `stage` (1, 2 or 3) on `gpus`.

    DeepSpeed's bf16 ZeRO keeps the bf16 weights whole (stage 3: partitioned) and partitions the optimizer's part
    (stage 1: the fp32 master weights and Adam's two moments; stage 2 also the bf16 gradients): during
    `engine.step` it also holds an fp32 copy of the gradient partition, after backward has freed the activations.
    `trainable` (LoRA: the adapters) is what has gradients and optimizer state; the frozen reference is bf16, whole
    under stages 1-2 and partitioned under 3, and absent for LoRA (the policy with its adapters off).
    `offload_optimizer` keeps master weights and moments in host memory. `cuda_context`: fixed bytes on top.
    """
    n = gpus
    trainable = params if trainable is None else trainable
    weights = 2 * params / (n if stage == 3 else 1)
    optimizer_share = 1 / n if stage >= 1 else 1
    parts = {
        "weights_bf16": weights,
        "grads_bf16": 2 * trainable / (n if stage >= 2 else 1),
        "master_fp32": 0.0 if offload_optimizer else 4 * trainable * optimizer_share,
        "adam_moments_fp32": 0.0 if offload_optimizer else 8 * trainable * optimizer_share,
        "grad_fp32_in_step": 0.0 if offload_optimizer else 4 * trainable * optimizer_share,
        "buckets": 2 * min(bucket_elements, trainable) * (2 if stage == 3 else 1),
        "reference_bf16": weights if reference else 0.0,
        "activations": activations,
        "cuda_context": cuda_context,
    }
    parts["total"] = sum(v for k, v in parts.items() if k not in ("activations", "grad_fp32_in_step")) + max(
        activations, parts["grad_fp32_in_step"])
    return parts


def training_memory_per_gpu(kind: str, params: int, *, resolution: int, pairs_per_worker: int, stage: int,
                            gpus: int, checkpointing: bool, lora_parameters: int | None = None,
                            offload_optimizer: bool = False, reference: bool = True) -> WorkerMemory:
    """One worker's peak for a training step of `pairs_per_worker` pairs (2 images each) of a `kind` UNet.
    `lora_parameters`: the adapters' count for a LoRA run (the reference is then the policy itself)."""
    activations = activation_bytes(kind, resolution=resolution, images=2 * pairs_per_worker,
                                   checkpointing=checkpointing)
    parts = zero_memory_per_gpu(params, stage=stage, gpus=gpus, activations=activations,
                                reference=reference and lora_parameters is None, trainable=lora_parameters,
                                offload_optimizer=offload_optimizer, cuda_context=CUDA_CONTEXT_BYTES)
    return WorkerMemory(parts=parts, total=parts["total"])
