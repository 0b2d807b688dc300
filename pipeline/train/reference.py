"""The frozen reference of the preference objectives, as one component whatever it is made of.

Three forms: a frozen copy of the UNet in the training dtype on the device (ZeRO-2, full fine-tune); a ZeRO-3
inference engine that holds 1/N of that copy on each rank and gathers a layer's weights for its forward; or, for
LoRA, the policy itself with its adapters switched off (no second copy at all).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


class Reference:
    """Callable like a UNet (no gradients). `runner` is what a call runs: a frozen UNet, a ZeRO-3 inference engine,
    or the policy engine whose adapters are switched off for the call; `.module` is the UNet itself."""

    def __init__(self, runner: Callable, *, adapters_off_of: Any = None):
        self.runner = runner
        self.module = getattr(runner, "module", runner)  # a DeepSpeed engine holds the UNet as .module
        # LoRA: the peft adapter layers of the adapted UNet, found once (diffusers' disable_adapters() walks every
        # module of the UNet on each call, twice a step).
        self._adapter_layers = [] if adapters_off_of is None else _adapter_layers(adapters_off_of)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While inside, `self.runner` computes the reference (LoRA: adapters off); never with gradients."""
        with torch.no_grad():
            if not self._adapter_layers:
                yield
                return
            # The layer's own switch, the flag its forward reads. peft's enable_adapters() also resets
            # requires_grad on every adapter weight each time (3-4 ms a step on the CPU bench for a tiny UNet):
            # pointless here, where nothing records gradients, and the trainable set must stay as it is.
            for layer in self._adapter_layers:
                layer._disable_adapters = True
            try:
                yield
            finally:
                for layer in self._adapter_layers:
                    layer._disable_adapters = False

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.runner(*args, **kwargs)


def _adapter_layers(unet: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("a LoRA reference needs a UNet with peft adapters; this one has none")
    if not all(isinstance(getattr(layer, "_disable_adapters", None), bool) for layer in layers):
        import peft

        raise RuntimeError(f"peft {peft.__version__}'s adapter layers have no _disable_adapters flag, which the LoRA "
                           f"reference switches; install the peft version pyproject.toml names")
    return layers


def frozen_copy(unet: torch.nn.Module) -> Reference:
    """A frozen copy of `unet` where it lives (the device, the training dtype): no second host copy."""
    import copy

    return Reference(copy.deepcopy(unet).requires_grad_(False).eval())


def lora_reference(policy_engine) -> Reference:
    return Reference(policy_engine, adapters_off_of=policy_engine.module)


def zero3_reference(unet: torch.nn.Module, ds_config: dict) -> Reference:
    """An inference-only DeepSpeed engine over a UNet built under `deepspeed.zero.Init` (already partitioned).

    Every rank must run each reference forward (they do: the loss needs every rank's rewards).
    """
    import deepspeed

    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16", "steps_per_print",
            "wall_clock_breakdown")
    config = {key: value for key, value in ds_config.items() if key in keep}
    config["zero_optimization"] = {k: v for k, v in ds_config["zero_optimization"].items() if k != "offload_optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=unet.requires_grad_(False), config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, unlike nn.Module.eval()
    return Reference(engine)
