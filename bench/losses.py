"""Cost of the alignment losses next to one tiny UNet forward: RPO's B x B part is negligible.

Run from the repository root:

    .venv/bin/python bench/losses.py

Times forward+backward of RPO (similarity weights from 768-d CLIP-sized embeddings, then the B x B loss)
and of DPO for B in {1, 8, 64, 512} pairs, the median of repeated runs, next to the no-grad forward of a
tiny diffusers UNet2DConditionModel (0.8M parameters; SD1.5's has 860M, SDXL's 2.6B) at batch 2 on 16x16
latents. Prints a table and writes bench/results/losses.json. Runs on CUDA when there is a GPU
(`--device cpu` to force the CPU).
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from pipeline.losses import dpo_loss, rpo_loss, similarity_weights

BATCH_SIZES = (1, 8, 64, 512)
EMBED_DIM = 768  # CLIP ViT-L/14 projection size
RESULTS = Path(__file__).parent / "results" / "losses.json"


def median_ms(step: Callable[[], None], device: torch.device, *, warmup: int, repeats: int) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loss_steps(batch: int, device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward+backward closures of RPO and DPO on random MSEs (with grad) and embeddings (constants)."""
    g = torch.Generator().manual_seed(batch)
    mses = [(0.2 + 0.01 * torch.rand(batch, generator=g)).to(device).requires_grad_() for _ in range(4)]
    embeddings = [torch.randn(batch, EMBED_DIM, generator=g).to(device) for _ in range(3)]

    def rpo() -> None:
        weights = similarity_weights(*embeddings, alpha=0.5, tau=0.1)
        rpo_loss(*mses, weights, beta=5000.0).backward()

    def dpo() -> None:
        dpo_loss(*mses, beta=5000.0).backward()

    return rpo, dpo


def tiny_unet_forward(device: torch.device) -> tuple[Callable[[], None], int]:
    """A no-grad forward closure of a tiny UNet (random weights) and its parameter count."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    ).to(device)
    latents = torch.randn(2, 4, 16, 16, device=device)
    timesteps = torch.tensor([10, 500], device=device)
    text = torch.randn(2, 77, 64, device=device)

    @torch.no_grad()
    def forward() -> None:
        unet(latents, timesteps, encoder_hidden_states=text)

    return forward, sum(p.numel() for p in unet.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)

    unet_forward, unet_parameters = tiny_unet_forward(device)
    unet_ms = median_ms(unet_forward, device, warmup=3, repeats=max(5, args.repeats // 2))
    rows = []
    for batch in BATCH_SIZES:
        rpo, dpo = loss_steps(batch, device)
        rows.append(
            {
                "batch": batch,
                "rpo_fwd_bwd_ms": median_ms(rpo, device, warmup=5, repeats=args.repeats),
                "dpo_fwd_bwd_ms": median_ms(dpo, device, warmup=5, repeats=args.repeats),
            }
        )

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"median of {args.repeats} repeats")
    print(f"tiny UNet ({unet_parameters / 1e6:.2f}M params) forward, batch 2, 16x16 latents: {unet_ms:.2f} ms")
    print(f"{'B pairs':>8} {'RPO fwd+bwd ms':>15} {'DPO fwd+bwd ms':>15} {'RPO / UNet fwd':>15}")
    for row in rows:
        rpo_ms, dpo_ms = row["rpo_fwd_bwd_ms"], row["dpo_fwd_bwd_ms"]
        print(f"{row['batch']:>8} {rpo_ms:>15.3f} {dpo_ms:>15.3f} {rpo_ms / unet_ms:>15.3f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "embed_dim": EMBED_DIM,
                "unet_parameters": unet_parameters,
                "unet_forward_batch2_16x16_ms": unet_ms,
                "losses": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
