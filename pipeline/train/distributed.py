"""Collectives of the worker loop, on the worker's device, and metrics that stay there until a log line.

NCCL only reduces tensors on the GPU (a CPU tensor fails in the first collective), gloo only on the CPU; so every
tensor reduced here lives on the device the training tensors live on. Reading a GPU value on the host waits for
all queued work to finish, so metrics are summed on the device and read once per log line.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def non_finite_flags(losses: list[torch.Tensor]) -> torch.Tensor:
    """Per loss, 1.0 where any rank's loss is not finite, else 0.0: one device tensor, reduced (MAX) across the
    ranks in one collective.

    Nothing is read on the host here; the caller reads the flags once per optimizer step (after the last backward
    of the accumulation, before the optimizer step). Every rank must call this with as many losses, so that all
    agree to stop and none hangs in the next collective.
    """
    import torch.distributed as dist

    flags = torch.stack([(~torch.isfinite(loss.detach())).any() for loss in losses]).to(torch.float32)
    if world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class DeviceMetrics:
    """Sums of scalar metrics on the device between log lines; `mean_across_ranks` reads them in one transfer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # optimizer steps added since the last read

    def add(self, values: dict[str, torch.Tensor | float], *, weight: float = 1.0) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value, device=self.device).detach().to(torch.float32).reshape(())
            self.sums[key] = self.sums[key] + value * weight if key in self.sums else value * weight

    def step_done(self) -> None:
        self.count += 1

    def mean_across_ranks(self) -> dict[str, float]:
        """Per-step means since the last read, averaged over the ranks (one all-reduce, one host read), then reset.

        Every rank must call it at the same steps with the same keys.
        """
        import torch.distributed as dist

        keys = sorted(self.sums)
        if not keys:
            return {}
        vector = torch.stack([self.sums[k] for k in keys]).to(torch.float64) / max(self.count, 1)
        if world_size() > 1:
            dist.all_reduce(vector)
            vector /= world_size()
        values = vector.tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values))


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """This worker's peak host resident set and (on a GPU) peak allocated device memory so far, in GiB."""
    import resource

    found = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}  # Linux: KiB
    if device.type == "cuda":
        found["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return found
