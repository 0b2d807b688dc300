"""train.compile: the compiled policy and reference give the eager run's losses and updates (LoRA and full).

The backend here is aot_eager: dynamo's capture (the LoRA flag's guard, DeepSpeed's hooks around the graph) and
AOTAutograd's backward, without inductor's C++ code generation, which takes minutes on this CPU
(`bench/train_step.py --compile` measures inductor)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
STEPS = 2
PAIRS = 2


def micro_pipeline(folder: str) -> str:
    """The smallest UNet with cross-attention (so LoRA has targets) and a DDPM schedule, as a pipeline folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=4, block_out_channels=(8, 16), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).save_pretrained(os.path.join(folder, "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


def run_steps(mode: str, compile_: bool, model_path: str):
    from pipeline.config import load_config
    from pipeline.train.models import setup_models
    from pipeline.train.step import PairBatch, preference_loss
    from pipeline.train.worker import WorkerPlan

    cfg = load_config(None, ["model.pretrained=tiny", "model.clip_pretrained=random", f"train.mode={mode}", "loss.objective=rpo", "loss.beta=500",
                             f"train.batch_size_per_worker={PAIRS}", "train.lr=1e-2", f"train.compile={'aot_eager' if compile_ else 'null'}"])
    plan = WorkerPlan(model_path=model_path, kind="sd15", train_rows=0, model_out="")
    models = setup_models(cfg, plan, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        batch = PairBatch(
            pair_ids=[f"p{i}" for i in range(PAIRS)],
            latents_w=torch.randn(PAIRS, 4, 4, 4, generator=g), latents_l=torch.randn(PAIRS, 4, 4, 4, generator=g),
            prompt_embeds=torch.randn(PAIRS, 77, 8, generator=g), pooled_prompt_embeds=None,
            add_time_ids_w=None, add_time_ids_l=None, clip_text=torch.randn(PAIRS, 6, generator=g),
            clip_image_w=torch.randn(PAIRS, 6, generator=g), clip_image_l=torch.randn(PAIRS, 6, generator=g),
        )
        noise, timesteps = torch.randn(PAIRS, 4, 4, 4, generator=g), torch.randint(0, 1000, (PAIRS,), generator=g)
        loss, _ = preference_loss(models.engine, models.reference, models.scheduler, batch, noise, timesteps, cfg.loss)
        models.engine.backward(loss)
        models.engine.step()
        losses.append(loss.item())
    trained = {k: v.detach().clone() for k, v in models.engine.module.named_parameters() if v.requires_grad}
    return losses, trained


def one_process(rank: int, store: str, model_path: str, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="1")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    try:
        results = {f"{mode}_{c}": run_steps(mode, c, model_path) for mode in ("lora", "full") for c in (False, True)}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_compiled_steps_match_eager_for_lora_and_full(tmp_path):
    model_path = micro_pipeline(str(tmp_path / "micro"))
    out = tmp_path / "results.pt"
    mp.spawn(one_process, args=(str(tmp_path / "store"), model_path, str(out)), nprocs=1, join=True)
    results = torch.load(out, weights_only=True)
    for mode in ("lora", "full"):
        (eager_losses, eager), (compiled_losses, compiled) = results[f"{mode}_False"], results[f"{mode}_True"]
        assert eager_losses[0] != eager_losses[1]  # the first step moved the policy: step 2 saw an updated model
        # Equal adapters need the seeded LoRA init (setup_models seeds peft's draw of A with train.seed).
        torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
        assert eager.keys() == compiled.keys() and eager
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
