import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train.deepspeed_config import deepspeed_config, resolve_precision


def test_precision_auto():
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16_supported=False) == "fp16"
    assert resolve_precision("fp32", cuda=True, bf16_supported=True) == "fp32"


def test_zero2_default_on_several_workers_and_zero3_offload():
    cfg = load_config(None, ["train.batch_size_per_worker=3", "train.grad_accum_steps=2", "train.grad_clip=0.5",
                             "train.num_workers=2"])
    ds = deepspeed_config(cfg.train, precision="bf16", num_params=10**9)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds and "offload_optimizer" not in ds["zero_optimization"]
    cfg = load_config(None, ["train.zero_stage=3", "train.offload_optimizer=true"])
    ds = deepspeed_config(cfg.train, precision="fp32", num_params=1000)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] and "bf16" not in ds
    # buckets never larger than the model (DeepSpeed allocates them whole), capped for big models
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 1000


def test_zero_stage_auto_is_1_without_gradient_hooks_for_lora_and_one_worker_and_2_for_full_on_several():
    def zero(*overrides: str) -> dict:
        return deepspeed_config(load_config(None, list(overrides)).train, precision="fp32",
                                num_params=1000)["zero_optimization"]

    # contiguous_gradients would make stage 1 register a backward hook per parameter
    for lora in (zero("train.mode=lora", "train.num_workers=1"), zero("train.mode=lora", "train.num_workers=4")):
        assert lora["stage"] == 1 and lora["contiguous_gradients"] is False
    one_worker = zero("train.mode=full", "train.num_workers=1")
    assert one_worker["stage"] == 1 and one_worker["contiguous_gradients"] is False
    several = zero("train.mode=full", "train.num_workers=2")
    assert several["stage"] == 2 and several["contiguous_gradients"] is True
    assert deepspeed_config(load_config(None, ["train.mode=lora", "train.zero_stage=2"]).train, precision="fp32",
                            num_params=1000)["zero_optimization"]["stage"] == 2


def test_train_deepspeed_merges_what_the_settings_do_not_name_and_refuses_what_they_decide():
    cfg = load_config(None, ["train.num_workers=2", "train.deepspeed.zero_optimization.overlap_comm=true",
                             "train.deepspeed.bf16.check_grad_overflow=false"])
    ds = deepspeed_config(cfg.train, precision="bf16", num_params=1000)
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 1000  # kept
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    for key, setting in (("zero_optimization.stage=3", "train.zero_stage"), ("gradient_clipping=0", "train.grad_clip"),
                         ("bf16.enabled=true", "train.precision")):
        with pytest.raises(ConfigError, match=rf"'train.deepspeed.{key.split('=')[0]}': set by {setting}"):
            load_config(None, [f"train.deepspeed.{key}"])
