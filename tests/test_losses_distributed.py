"""rpo_loss_global on 2 real gloo ranks (torch.multiprocessing spawn, FileStore rendezvous) against one process."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.losses import (
    all_gather_with_grad,
    implicit_rewards,
    preference_metrics,
    rpo_loss,
    rpo_loss_global,
    similarity_weights,
)

WORLD_SIZE = 2
LOCAL_BATCH = 3
BETA, ALPHA, TAU = 200.0, 0.5, 0.1


def global_batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The concatenated batch of both ranks: 4 MSE vectors [N] and 3 embedding matrices [N, D], float64."""
    g = torch.Generator().manual_seed(0)
    n = WORLD_SIZE * LOCAL_BATCH
    mses = [0.2 + 0.02 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]
    embeddings = [torch.randn(n, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    return mses, embeddings


def rank_main(rank: int, store_path: str, out_dir: str) -> None:
    """One data-parallel rank: its slice of the global batch through rpo_loss_global, then backward."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        mses, embeddings = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local_mses = [m[rows].clone().requires_grad_() for m in mses]
        loss, metrics = rpo_loss_global(
            *local_mses, *(e[rows] for e in embeddings), beta=BETA, alpha=ALPHA, tau=TAU
        )
        loss.backward()
        result = {"loss": loss.detach(), "grads": [m.grad for m in local_mses], "metrics": metrics}

        # Unequal first dims must fail on every rank with a message, not hang in the backend.
        try:
            all_gather_with_grad(torch.zeros(LOCAL_BATCH + rank))
            result["size_error"] = ""
        except ValueError as error:
            result["size_error"] = str(error)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_rpo_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    mses, embeddings = global_batch()
    mses = [m.clone().requires_grad_() for m in mses]
    weights = similarity_weights(*embeddings, alpha=ALPHA, tau=TAU)
    single_loss = rpo_loss(*mses, weights, beta=BETA)
    single_loss.backward()

    # The ranks' losses average to the single-process loss ...
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD_SIZE, single_loss.detach())
    # ... and each rank's input gradients are world_size x the single-process gradients of its slice, which
    # data-parallel averaging divides back. Non-zero checks keep a dropped all-reduce from passing.
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for local_grad, mse in zip(result["grads"], mses):
            assert local_grad.abs().min() > 0
            torch.testing.assert_close(local_grad / WORLD_SIZE, mse.grad[rows])

    # Metrics: each rank reports its own pairs, with its own losers at the offset diagonal.
    r_w, r_l = implicit_rewards(mses[0], mses[2], beta=BETA), implicit_rewards(mses[1], mses[3], beta=BETA)
    expected = preference_metrics(r_w, r_l, weights)
    for key, value in expected.items():
        torch.testing.assert_close(sum(r["metrics"][key] for r in ranks) / WORLD_SIZE, value.float())
    assert 0 < expected["off_diagonal_mass"] < 1

    for result in ranks:
        assert "rank 0: [3], rank 1: [4]" in result["size_error"]
