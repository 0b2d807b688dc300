"""End-to-end training runs on the tiny SDXL and the toy world: 2 CPU workers, DeepSpeed ZeRO over gloo.

Weights compared across runs: all runs are on CPU in fp32 with the same data order and noise, so a resumed or
restarted run must match an uninterrupted one to within 1e-6 (the all-reduce sums in the same order; the
tolerance only allows for that order changing under a different process layout).
"""

import os
import signal
import threading
import time

import psutil
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from pipeline.precompute import resolve_model_path
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow
STEPS = 6
WEIGHT_TOLERANCE = 1e-6


def _weights(model_uri: str) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(model_uri).state_dict()


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= WEIGHT_TOLERANCE, f"weights differ by up to {worst}"


@pytest.fixture(scope="module")
def uninterrupted(toy_store):
    cfg = toy_store.config("zero2", f"train.max_steps={STEPS}", "train.checkpoint_every=2")
    return cfg, run_training(cfg)


def test_zero2_run_writes_a_unet_diffusers_loads(uninterrupted):
    cfg, result = uninterrupted
    base = UNet2DConditionModel.from_pretrained(resolve_model_path(cfg), subfolder="unet").state_dict()
    trained = _weights(result.model_uri)
    assert any(not torch.equal(base[k], trained[k]) for k in base), "training changed the weights"
    assert result.metrics["step"] == STEPS
    for key in ("loss", "implicit_accuracy", "reward_margin", "policy_mse_w", "ref_mse_w", "off_diagonal_mass",
                "lr", "grad_norm", "samples_per_s", "holdout_accuracy", "start_holdout_accuracy"):
        assert key in result.metrics and result.metrics[key] == result.metrics[key], key  # present, not NaN
    assert result.metrics["skipped_steps"] == 0  # every update applied
    run_dir = os.path.join(cfg.run_dir, "train")
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0")) == [
        "checkpoint_00000004", "checkpoint_00000006"]  # keep_checkpoints=2
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as lines:
        assert [eval(line)["step"] for line in lines] == list(range(1, STEPS + 1))


def test_rerun_of_a_stopped_run_resumes_and_matches(toy_store, uninterrupted):
    _, expected = uninterrupted
    first = run_training(toy_store.config("resumed", "train.max_steps=4", "train.checkpoint_every=2"))
    assert first.metrics["step"] == 4
    resumed = run_training(toy_store.config("resumed", f"train.max_steps={STEPS}", "train.checkpoint_every=2"))
    assert resumed.metrics["step"] == STEPS
    assert "start_holdout_accuracy" not in resumed.metrics  # it continued; it did not start over
    _assert_same_weights(_weights(resumed.model_uri), _weights(expected.model_uri))


def _kill_a_worker_after(checkpoint_dir: str, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(checkpoint_dir):
        time.sleep(0.05)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


def test_killed_worker_is_restarted_and_the_run_matches(toy_store, uninterrupted):
    _, expected = uninterrupted
    cfg = toy_store.config("killed", f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.max_failures=2")
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_after, args=(os.path.join(cfg.run_dir, "train", "checkpoint_00000002"), killed)
    )
    killer.start()
    result = run_training(cfg)
    killer.join()
    assert killed, "a training worker was killed mid-run"
    assert result.metrics["step"] == STEPS
    _assert_same_weights(_weights(result.model_uri), _weights(expected.model_uri))


def _assert_same_update(toy_store, result, expected) -> None:
    """Same maths, other rounding (other reduction orders, another Adam kernel), which Adam's normalisation
    magnifies for near-zero gradients. So compare the updates as a whole: within 5% in norm."""
    base = UNet2DConditionModel.from_pretrained(resolve_model_path(toy_store.config("base")), subfolder="unet").state_dict()
    a, b = _weights(result.model_uri), _weights(expected.model_uri)
    update_gap = sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt()
    update = sum(((b[k] - base[k]).double() ** 2).sum() for k in b).sqrt()
    assert update > 0 and update_gap / update < 0.05, (update_gap / update).item()


def test_zero3_run_matches_zero2(toy_store, uninterrupted):
    _, zero2 = uninterrupted
    result = run_training(toy_store.config("zero3", f"train.max_steps={STEPS}", "train.checkpoint_every=2",
                                           "train.zero_stage=3"))
    _assert_same_update(toy_store, result, zero2)  # ZeRO-3 partitions parameters and reference, buckets differ


def test_optimizer_offload_run_matches(toy_store, uninterrupted):
    _, zero2 = uninterrupted
    result = run_training(toy_store.config("offload", f"train.max_steps={STEPS}", "train.checkpoint_every=2",
                                           "train.offload_optimizer=true"))
    _assert_same_update(toy_store, result, zero2)  # DeepSpeed's CPU Adam in place of torch's AdamW


def test_lora_run_resumes_and_loads_with_load_lora_weights(toy_store, monkeypatch):
    # A relative storage path, as the embedded default's "runs": the worker, whose working directory is Ray's,
    # must still export where the driver looks.
    monkeypatch.chdir(toy_store.storage.parent)
    lora = ("train.mode=lora", "train.lr=1e-2", "train.num_workers=1", "loss.objective=dpo", "train.checkpoint_every=2",
            f"cluster.storage_path={toy_store.storage.name}")
    assert run_training(toy_store.config("lora", *lora, "train.max_steps=2")).metrics["step"] == 2
    cfg = toy_store.config("lora", *lora, "train.max_steps=3")  # ZeRO-1 (auto for LoRA), adapters-only checkpoint
    result = run_training(cfg)
    assert result.metrics["step"] == 3 and "start_holdout_accuracy" not in result.metrics  # resumed
    lora_file = os.path.join(result.model_uri, "pytorch_lora_weights.safetensors")
    assert os.path.exists(lora_file)
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model_path(cfg), local_files_only=True)
    before = _unet_output(pipe.unet)
    pipe.load_lora_weights(result.model_uri)
    assert pipe.get_list_adapters()["unet"]
    assert not torch.allclose(before, _unet_output(pipe.unet)), "the trained LoRA changes the UNet's output"


def _unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 4, generator=gen)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_dim, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(toy_store):
    """The flags of a step's micro-batches are read once, before the update: the error names the micro-batches."""
    cfg = toy_store.config("nan", "train.max_steps=4", "train.checkpoint_every=1", "train.lr=1e30",
                           "train.grad_clip=0", "train.num_workers=1", "train.grad_accum_steps=2")
    with pytest.raises(Exception, match=r"non-finite loss at step \d+ in micro-batches \[0"):
        run_training(cfg)
    checkpoints = sorted(d for d in os.listdir(os.path.join(cfg.run_dir, "train")) if d.startswith("checkpoint_0"))
    assert checkpoints and checkpoints[-1] < "checkpoint_00000004"


def test_training_options_run_and_gradient_checkpointing_keeps_the_maths(toy_store):
    """Adafactor, gradient accumulation, warmup + cosine schedule and prompt dropout in one run; the same run with
    gradient checkpointing must end with the same weights (recomputing activations must not change a gradient)."""
    options = [
        "train.max_steps=4", "train.checkpoint_every=4", "train.num_workers=1", "train.optimizer=adafactor",
        "train.grad_accum_steps=2", "train.lr_warmup_steps=2", "train.lr_schedule=cosine",
        "train.prompt_dropout=0.5",
    ]
    plain = run_training(toy_store.config("options", *options))
    checkpointed = run_training(toy_store.config("options_gc", *options, "train.gradient_checkpointing=true"))
    assert plain.metrics["step"] == checkpointed.metrics["step"] == 4
    with open(os.path.join(toy_store.config("options").run_dir, "train", "metrics.jsonl")) as lines:
        logged = [eval(line) for line in lines]
    dropped = sum(m["dropped_prompts"] for m in logged) / len(logged)
    assert 0.1 < dropped < 0.9, dropped  # about half of the pairs saw the empty prompt
    # After optimizer step k the lr is base * multiplier(k): warmup over steps 0-1, then cosine to 0 at step 4.
    assert [m["lr"] for m in logged] == pytest.approx([1e-4, 1e-4, 5e-5, 0.0], abs=1e-12)
    _assert_same_weights(_weights(checkpointed.model_uri), _weights(plain.model_uri))


def test_planned_batches_train_on_two_workers(toy_store):
    """train.batches=planned: the plan is built for the global batch (2 workers x 2 pairs) and each worker reads its
    slots of every planned batch with the stored similarity rows (resume on a plan: tests/precompute/test_plan.py
    and tests/train/test_step.py hold the order)."""
    result = run_training(toy_store.config("planned", "train.batches=planned", "train.plan_batches_per_cluster=2",
                                           "train.max_steps=2", "train.checkpoint_every=2"))
    plans = [p for p in (toy_store.store / "plans").iterdir() if (p / "plan.json").exists()]
    assert len(plans) == 1 and result.metrics["step"] == 2
    for key in ("loss", "implicit_accuracy", "off_diagonal_mass", "holdout_accuracy"):
        assert result.metrics[key] == result.metrics[key], key  # present, not NaN
