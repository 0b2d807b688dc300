"""bench/cost_model.py on a tiny UNet config: the counted FLOPs agree with a hand count, the step adds up."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench" / "cost_model.py"
TINY = dict(
    sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_flops_of_one_conv_and_one_linear_match_a_hand_count(cost_model):
    unet = cost_model.build_meta_unet(TINY)
    assert next(unet.parameters()).device.type == "meta" and next(unet.parameters()).dtype == torch.bfloat16
    images, latent = 3, 8
    by_module = cost_model.forward_flops_by_module(unet, latent=latent, images=images)
    # conv_in: 4 -> 32 channels, 3x3, one output pixel per latent pixel: 2 FLOPs per multiply-add.
    assert by_module["UNet2DConditionModel.conv_in"] == 2 * images * 32 * 4 * 3 * 3 * latent * latent
    # time_embedding.linear_1: 32 -> 128 (4 x the first block's channels) per image.
    assert by_module["UNet2DConditionModel.time_embedding.linear_1"] == 2 * images * 32 * 128


def test_a_step_is_policy_forward_backward_plus_reference_forward(cost_model):
    unet = cost_model.build_meta_unet(TINY)
    one = cost_model.count_step_flops(unet, latent=8, pairs=1)
    two = cost_model.count_step_flops(unet, latent=8, pairs=2)
    assert one.reference_forward == one.policy_forward > 0
    # Backward computes gradients of weights and inputs (2x forward) but not of the latents' input (conv_in).
    assert 1.8 < one.policy_backward / one.policy_forward < 2.0
    assert two.per_pair == pytest.approx(one.per_pair, rel=1e-6)
    assert one.total == 2 * cost_model.forward_flops_by_module(unet, latent=8, images=2)["Global"] + one.policy_backward


