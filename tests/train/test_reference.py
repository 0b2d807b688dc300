"""The frozen reference under ZeRO-3 on 2 real gloo ranks: partitioned across them, and still the base UNet."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.models.loader import load_components
from pipeline.models.tiny import build_tiny_sdxl

WORLD_SIZE = 2


def unet_inputs(unet) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled_dim, generator=g),
             "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    args = (torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]))
    return args, {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
                  "added_cond_kwargs": added}


def rank_main(rank: int, model_path: str, store_path: str, out_dir: str, stage: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        from pipeline.train.worker import WorkerPlan, setup_models

        cfg = load_config(None, [f"train.zero_stage={stage}", "train.precision=fp32"])
        plan = WorkerPlan(model_path=model_path, kind="sdxl", train_rows=0, model_out="")
        _, reference, _, _ = setup_models(cfg, plan, torch.device("cpu"))
        module = getattr(reference, "module", reference)
        # Under ZeRO-3 a parameter's local shard is ds_tensor; a plain module holds every element itself.
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
        args, kwargs = unet_inputs(module)
        with torch.no_grad():
            output = reference(*args, **kwargs).sample
        torch.save({"held": held, "output": output}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, stage: int) -> list[dict]:
    model_path = str(build_tiny_sdxl(tmp_path / "tiny"))
    out = tmp_path / f"stage{stage}"
    out.mkdir()
    mp.spawn(rank_main, args=(model_path, str(out / "store"), str(out), stage), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_zero3_partitions_the_reference_and_keeps_its_output(tmp_path):
    base = load_components(str(build_tiny_sdxl(tmp_path / "tiny")), kind="sdxl", parts=("unet",)).unet
    total = sum(p.numel() for p in base.parameters())
    args, kwargs = unet_inputs(base)
    with torch.no_grad():
        expected = base(*args, **kwargs).sample

    for stage, share in ((2, 1.0), (3, 1 / WORLD_SIZE)):
        ranks = run_ranks(tmp_path, stage)
        for rank in ranks:
            # ZeRO-3 pads each parameter's shard to a multiple of the world size: a little over half.
            assert rank["held"] / total == pytest.approx(share, rel=0.02), (stage, rank["held"], total)
            torch.testing.assert_close(rank["output"], expected, rtol=1e-5, atol=1e-5)
