"""The worker's step functions one by one: denoising target, prompt dropout, resume skipping, device metrics,
the non-finite flags, the out-of-memory advice, the reference component."""

import numpy as np
import ray
import torch
from diffusers import DDPMScheduler

from pipeline.config import load_config
from pipeline.train.distributed import DeviceMetrics, non_finite_flags
from pipeline.train.noise import draw, draw_for_batch
from pipeline.train.reference import Reference
from pipeline.train.step import PairBatch, apply_prompt_dropout, denoising_target
from pipeline.train.worker import micro_batches, out_of_memory_advice, to_pair_batch


def test_v_prediction_target_is_alpha_noise_minus_sigma_latents():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].view(3, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(denoising_target(scheduler, latents, noise, t), expected)
    epsilon = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    assert denoising_target(epsilon, latents, noise, t) is noise


def _batch(n: int) -> PairBatch:
    z = torch.zeros(n, 4, 2, 2)
    return PairBatch([f"p{i}" for i in range(n)], z, z.clone(), torch.ones(n, 77, 8), torch.ones(n, 6),
                     torch.zeros(n, 6), torch.zeros(n, 6), torch.zeros(n, 5), torch.zeros(n, 5), torch.zeros(n, 5))


def test_prompt_dropout_swaps_in_the_empty_prompt_only_where_drawn():
    batch = _batch(3)
    empty = (torch.full((77, 8), -1.0), torch.full((6,), -2.0))
    apply_prompt_dropout(batch, torch.tensor([True, False, True]), empty)
    assert torch.equal(batch.prompt_embeds[0], empty[0]) and torch.equal(batch.prompt_embeds[2], empty[0])
    assert torch.equal(batch.prompt_embeds[1], torch.ones(77, 8))
    assert torch.equal(batch.pooled_prompt_embeds[:, 0], torch.tensor([-2.0, 1.0, -2.0]))


def test_draw_for_batch_matches_draw_and_follows_the_latents():
    latents = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    on_batch = draw_for_batch(["a", "b"], latents, seed=1, step=2, micro_step=0, num_train_timesteps=1000,
                              prompt_dropout=0.5)
    plain = draw(["a", "b"], seed=1, step=2, micro_step=0, latent_shape=(4, 3, 3), num_train_timesteps=1000,
                 prompt_dropout=0.5)
    assert torch.equal(on_batch.noise, plain.noise) and on_batch.noise.dtype == torch.float32
    assert torch.equal(on_batch.timesteps, plain.timesteps) and torch.equal(on_batch.drop_prompt, plain.drop_prompt)


def test_a_resumed_run_skips_exactly_the_micro_batches_it_trained_on(ray_session):
    cfg = load_config(None, ["train.batch_size_per_worker=2", "train.grad_accum_steps=2"])
    shard = ray.data.from_items([{"pair_id": f"p{i:02d}"} for i in range(20)])
    per_epoch = 20 // 2 // 2  # 5 optimizer steps of 2 micro-batches

    def ids(start_step: int, count: int) -> list[tuple[int, int, tuple]]:
        out = []
        for step, micro, rows in micro_batches(shard, cfg, start_step=start_step, per_epoch=per_epoch):
            out.append((step, micro, tuple(rows["pair_id"])))
            if len(out) == count:
                return out

    uninterrupted = ids(0, 16)  # into the second epoch
    assert [s for s, _, _ in uninterrupted] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert ids(3, 10) == uninterrupted[6:]
    assert ids(6, 4) == uninterrupted[12:]  # a resume in the second epoch keeps that epoch's order
    assert set(p for *_, rows in uninterrupted[:10] for p in rows) == {f"p{i:02d}" for i in range(20)}
    assert [r for *_, r in uninterrupted[:10]] != [r for *_, r in uninterrupted[10:]] + [()] * 4  # reshuffled


def test_planned_batches_keep_the_plan_order_every_epoch_and_carry_their_similarity_rows(ray_session):
    cfg = load_config(None, ["train.batch_size_per_worker=2", "train.batches=planned"])
    shard = ray.data.from_items([{"pair_id": f"p{i:02d}"} for i in range(8)])
    seen = [tuple(rows["pair_id"]) for _, (_, _, rows) in zip(range(6), micro_batches(shard, cfg, start_step=0,
                                                                                       per_epoch=4))]
    assert seen == [("p00", "p01"), ("p02", "p03"), ("p04", "p05"), ("p06", "p07"), ("p00", "p01"), ("p02", "p03")]
    rows = {"pair_id": np.array(["a", "b"]), "latents_w": np.zeros((2, 4, 2, 2), np.float16),
            "latents_l": np.zeros((2, 4, 2, 2), np.float16), "prompt_embeds": np.zeros((2, 77, 8), np.float16),
            "pooled_prompt_embeds": np.zeros((2, 6), np.float16), "add_time_ids_w": np.zeros((2, 6), np.float32),
            "add_time_ids_l": np.zeros((2, 6), np.float32), "clip_text": np.zeros((2, 5), np.float32),
            "clip_image_w": np.zeros((2, 5), np.float32), "clip_image_l": np.zeros((2, 5), np.float32)}
    assert to_pair_batch(rows, sdxl=True, device=torch.device("cpu"), dtype=torch.float32).s_text is None
    planned = rows | {"s_text": np.full((2, 4), 0.5, np.float32), "s_image": np.full((2, 4), 0.25, np.float32)}
    batch = to_pair_batch(planned, sdxl=True, device=torch.device("cpu"), dtype=torch.float32)
    assert batch.s_text.shape == (2, 4) and batch.s_image[0, 0].item() == 0.25


def test_device_metrics_average_the_steps_and_read_once():
    metrics = DeviceMetrics(torch.device("cpu"))
    for step_loss in (1.0, 3.0):
        for micro in range(2):  # two micro-steps per step, weighted by 1/2
            metrics.add({"loss": torch.tensor(step_loss + micro), "acc": 0.5}, weight=0.5)
        metrics.step_done()
    assert metrics.mean_across_ranks() == {"acc": 0.5, "loss": 2.5}
    assert metrics.mean_across_ranks() == {}  # reset after a read


def test_non_finite_flags_mark_each_micro_batch_loss():
    losses = [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(-2.5), torch.tensor(float("-inf"))]
    assert non_finite_flags(losses).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_out_of_memory_advice_names_every_memory_setting():
    cfg = load_config(None, ["train.batch_size_per_worker=4", "train.num_workers=2"])
    text = out_of_memory_advice(cfg, "in the first training step (step 0)")
    for setting in ("train.batch_size_per_worker=4", "train.zero_stage=2", "train.offload_optimizer=false",
                    "train.gradient_checkpointing=false", "train.grad_accum_steps", "train.zero_stage=3",
                    "train.gradient_checkpointing=true", "train.offload_optimizer=true"):
        assert setting in text, setting
    done = load_config(None, ["train.batch_size_per_worker=1", "train.gradient_checkpointing=true",
                              "train.offload_optimizer=true", "train.mode=lora"])
    assert "train.gradient_checkpointing=true (" not in out_of_memory_advice(done, "x")


def test_reference_runs_without_gradients_and_with_lora_adapters_off():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(8, 16), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    x, t, text = torch.randn(1, 4, 4, 4), torch.tensor([10]), torch.randn(1, 77, 8)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (adapter == identity); as after training, it is not
            p.data.normal_(0, 0.5)
    adapted = unet(x, t, encoder_hidden_states=text).sample
    reference = Reference(unet, adapters_off_of=unet)
    out = reference(x, t, encoder_hidden_states=text).sample
    assert not out.requires_grad
    torch.testing.assert_close(out, base)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, adapted)  # adapters back on
    assert all(p.requires_grad for name, p in unet.named_parameters() if "lora_" in name)  # still trainable
    assert reference.module is unet
