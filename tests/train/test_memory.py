"""The memory model of a training worker (pipeline/train/memory.py), by hand, and its measured constants."""

import json
from pathlib import Path

import pytest

from pipeline.train.memory import (
    ACTIVATION_BYTES_PER_IMAGE,
    CUDA_CONTEXT_BYTES,
    activation_bytes,
    training_memory_per_gpu,
    zero_memory_per_gpu,
)

P = 1_000_000_000


def test_zero_memory_partitions_with_the_gpu_count():
    z2_1 = zero_memory_per_gpu(P, stage=2, gpus=1, activations=0, bucket_elements=0)
    assert z2_1["total"] == (2 + 2 + 4 + 8 + 2) * P + 4 * P  # weights, grads, master, moments, reference, fp32 grads
    z2_8 = zero_memory_per_gpu(P, stage=2, gpus=8, activations=0, bucket_elements=0)
    z3_8 = zero_memory_per_gpu(P, stage=3, gpus=8, activations=0, bucket_elements=0)
    assert z2_8["total"] == 4 * P + (2 + 4 + 8 + 4) * P / 8
    assert z3_8["total"] == (2 + 2 + 4 + 8 + 2 + 4) * P / 8
    z1_8 = zero_memory_per_gpu(P, stage=1, gpus=8, activations=0, bucket_elements=0)
    assert z1_8["total"] == (2 + 2 + 2) * P + (4 + 8 + 4) * P / 8  # stage 1 keeps the gradients whole


def test_lora_and_offload_keep_only_what_they_need_on_the_gpu():
    lora = zero_memory_per_gpu(P, stage=1, gpus=1, activations=0, bucket_elements=0, trainable=10**6, reference=False)
    assert lora["total"] == 2 * P + (2 + 4 + 8 + 4) * 10**6  # frozen bf16 weights + the adapters' training state
    offload = zero_memory_per_gpu(P, stage=2, gpus=1, activations=0, bucket_elements=0, offload_optimizer=True)
    assert offload["total"] == (2 + 2 + 2) * P  # weights, gradients, reference; master and moments on the host


def test_activations_scale_with_the_latent_area_and_the_worker_adds_its_context():
    _, plain, checkpointed = ACTIVATION_BYTES_PER_IMAGE["sdxl"]
    assert activation_bytes("sdxl", resolution=512, images=2, checkpointing=False) == pytest.approx(plain / 2)
    assert activation_bytes("sdxl", resolution=1024, images=1, checkpointing=True) == checkpointed
    worker = training_memory_per_gpu("sdxl", P, resolution=1024, pairs_per_worker=1, stage=2, gpus=8,
                                     checkpointing=True)
    bare = zero_memory_per_gpu(P, stage=2, gpus=8, activations=2 * checkpointed)
    assert worker.total == pytest.approx(bare["total"] + CUDA_CONTEXT_BYTES)


def test_the_activation_constants_are_the_cost_models_measurements():
    report = json.loads((Path(__file__).parents[2] / "bench" / "results" / "cost_model.json").read_text())
    for model in report["models"]:
        measured = model["activation_bytes_per_image"]
        assert ACTIVATION_BYTES_PER_IMAGE[model["unet"]] == (model["resolution"], measured["plain"],
                                                             measured["checkpointed"])
