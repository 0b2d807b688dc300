"""Preference-alignment losses for diffusion models: Diffusion-RPO, Diffusion-DPO and SFT.

Pure tensor functions; the only state they touch is torch.distributed (for the global batch).

Notation. A batch holds B pairs (winner w, loser l) that share noise and timestep.
`*_mse` are per-sample means over C,H,W of (noise - prediction)^2 for the policy ("model") and the frozen
reference ("ref"), shape [B]. The implicit reward of a sample (Diffusion-DPO, Wallace et al. 2023) is

    r = -(beta / 2) * (model_mse - ref_mse)

DPO contrasts each winner with its own loser: L = mean_i -log sigmoid(r_w[i] - r_l[i]).
RPO (Yin et al. 2024, "Relative Preference Optimization", weight inside the sigmoid, diagonal kept) contrasts
every winner with every loser, weighted by how related the two pairs are:

    S[i, j] = alpha * cos(text_i, text_j) + (1 - alpha) * cos(image_w_i, image_l_j)
    w[i, j] = softmax_j(-(1 - S[i, j]) / tau)                     each row sums to 1
    L       = mean_i mean_j -log sigmoid(w[i, j] * (r_w[i] - r_l[j]))

The matrices may be rectangular (rows: some winners, columns: all losers); that is how one data-parallel
rank computes its share of the global-batch loss (`rpo_loss_global`) with the same maths as `rpo_loss`.

Numerics: every log-sigmoid is `F.logsigmoid` (never log(sigmoid(x))), every softmax is `torch.softmax`
(max-subtracted) and runs in at least float32, and rewards are formed in at least float32, so the loss and
its gradients stay finite in fp32 and bf16 for beta up to 1e4 and tau down to 1e-3.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half types to float32 and keep float64 (so gradcheck in float64 stays exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_vector(name: str, x: Tensor, length: int | None = None) -> None:
    if x.ndim != 1 or (length is not None and x.shape[0] != length):
        want = f"[{length}]" if length is not None else "[B]"
        raise ValueError(f"{name} must be a 1-D per-sample tensor of shape {want}, got shape {list(x.shape)}")


# ----------------------------------------------------------------------------------------------- rewards


def implicit_rewards(model_mse: Tensor, ref_mse: Tensor, *, beta: float) -> Tensor:
    """-(beta/2) * (model_mse - ref_mse), shape [B], in at least float32.

    The difference is taken after upcasting because for beta in the thousands the reward is a large multiple
    of a small difference of two similar numbers. (Compute the MSEs themselves in float32 too: a bf16 MSE has
    already lost the digits that difference needs.)
    """
    _check_vector("model_mse", model_mse)
    _check_vector("ref_mse", ref_mse, model_mse.shape[0])
    return -(beta / 2) * (_at_least_float32(model_mse) - _at_least_float32(ref_mse))


# -------------------------------------------------------------------------------------- similarity weights


def cosine_similarity_matrix(rows: Tensor, cols: Tensor) -> Tensor:
    """cos(rows[i], cols[j]) for [R, D] x [C, D] -> [R, C], in at least float32; inputs need not be normalised."""
    if rows.ndim != 2 or cols.ndim != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(
            f"embeddings must be [N, D] matrices with the same D, got shapes {list(rows.shape)} and {list(cols.shape)}"
        )
    rows = F.normalize(_at_least_float32(rows), dim=1)
    cols = F.normalize(_at_least_float32(cols), dim=1)
    return rows @ cols.T


def weights_from_similarities(s_text: Tensor, s_image: Tensor, *, alpha: float, tau: float) -> Tensor:
    """RPO weights from precomputed cosine matrices (e.g. a batch plan's stored S_text and S_image), [R, C].

    S = alpha * s_text + (1 - alpha) * s_image, weights = row-softmax of -(1 - S) / tau, in at least float32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"loss.alpha must lie in [0, 1] (1 = prompt similarity only), got {alpha}")
    if not tau > 0.0:
        raise ValueError(f"loss.tau must be > 0 (small tau: sharper weights), got {tau}")
    if s_text.shape != s_image.shape or s_text.ndim != 2:
        raise ValueError(
            "s_text and s_image must be [R, C] matrices of one shape, "
            f"got {list(s_text.shape)} and {list(s_image.shape)}"
        )
    similarity = alpha * _at_least_float32(s_text) + (1.0 - alpha) * _at_least_float32(s_image)
    # Logits lie in [-2/tau, 0]; softmax subtracts the row max, so tau -> 0 gives one-hot rows, not overflow.
    return torch.softmax(-(1.0 - similarity) / tau, dim=1)


def _weights_for_rows(
    text_rows: Tensor, image_w_rows: Tensor, text_cols: Tensor, image_l_cols: Tensor, *, alpha: float, tau: float
) -> Tensor:
    return weights_from_similarities(
        cosine_similarity_matrix(text_rows, text_cols),
        cosine_similarity_matrix(image_w_rows, image_l_cols),
        alpha=alpha,
        tau=tau,
    )


def similarity_weights(
    text_emb: Tensor, image_emb_w: Tensor, image_emb_l: Tensor, *, alpha: float, tau: float
) -> Tensor:
    """RPO weights of a batch, [B, B]: row i says how much winner i is contrasted with each loser j.

    text_emb, image_emb_w, image_emb_l: [B, D] CLIP embeddings (normalised here). Rows sum to 1.
    """
    return _weights_for_rows(text_emb, image_emb_w, text_emb, image_emb_l, alpha=alpha, tau=tau)


# ------------------------------------------------------------------------------------------------ losses


def rpo_terms(r_w: Tensor, r_l: Tensor, weights: Tensor) -> Tensor:
    """The RPO loss matrix -log sigmoid(weights[i, j] * (r_w[i] - r_l[j])), shape [R, C].

    r_w: rewards of the row winners [R]; r_l: rewards of the column losers [C]; weights: [R, C].
    This is the one place the RPO maths lives; `rpo_loss` and `rpo_loss_global` take its mean.
    """
    _check_vector("r_w", r_w)
    _check_vector("r_l", r_l)
    if weights.shape != (r_w.shape[0], r_l.shape[0]):
        raise ValueError(
            f"weights must have shape [rows, cols] = [{r_w.shape[0]}, {r_l.shape[0]}] (winners x losers), "
            f"got {list(weights.shape)}"
        )
    margins = r_w[:, None] - r_l[None, :]
    return -F.logsigmoid(weights * margins)


def rpo_loss(
    model_mse_w: Tensor, model_mse_l: Tensor, ref_mse_w: Tensor, ref_mse_l: Tensor, weights: Tensor, *, beta: float
) -> Tensor:
    """Diffusion-RPO loss, a scalar: mean over i and j of -log sigmoid(weights[i, j] * (r_w[i] - r_l[j])).

    The winners' MSEs index the rows and the losers' MSEs the columns, so weights may be rectangular
    [B_rows, B_cols]; with square weights from `similarity_weights` this is the loss of one batch.
    """
    r_w = implicit_rewards(model_mse_w, ref_mse_w, beta=beta)
    r_l = implicit_rewards(model_mse_l, ref_mse_l, beta=beta)
    return rpo_terms(r_w, r_l, weights).mean()


def dpo_loss(model_mse_w: Tensor, model_mse_l: Tensor, ref_mse_w: Tensor, ref_mse_l: Tensor, *, beta: float) -> Tensor:
    """Diffusion-DPO loss, a scalar: mean_i -log sigmoid(r_w[i] - r_l[i]).

    Equal to the reference code's -logsigmoid(-0.5 * beta * ((m_w - m_l) - (ref_w - ref_l))).mean(),
    since r_w - r_l = -(beta/2) * ((m_w - ref_w) - (m_l - ref_l)).
    """
    r_w = implicit_rewards(model_mse_w, ref_mse_w, beta=beta)
    r_l = implicit_rewards(model_mse_l, ref_mse_l, beta=beta)
    _check_vector("model_mse_l", model_mse_l, r_w.shape[0])
    return -F.logsigmoid(r_w - r_l).mean()


def sft_loss(model_mse_w: Tensor) -> Tensor:
    """Supervised fine-tuning on the winners: their mean denoising MSE, a scalar."""
    _check_vector("model_mse_w", model_mse_w)
    return model_mse_w.mean()


# ----------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def preference_metrics(
    r_w: Tensor, r_l: Tensor, weights: Tensor | None = None, *, column_offset: int = 0
) -> dict[str, Tensor]:
    """Training metrics of B pairs (r_w[i], r_l[i]), detached float32 scalars.

    implicit_accuracy: share of pairs with r_w > r_l. reward_margin: mean of r_w - r_l.
    off_diagonal_mass: mean over rows of the weight that row i puts on losers other than its own
    (0 without weights; about 0 means RPO behaves like DPO). Pair i's own loser is column
    i + column_offset: a rank's rows of the global matrix start at rank * B_local.
    """
    _check_vector("r_w", r_w)
    _check_vector("r_l", r_l, r_w.shape[0])
    margins = (r_w - r_l).float()
    metrics = {
        "implicit_accuracy": (margins > 0).float().mean(),
        "reward_margin": margins.mean(),
        "off_diagonal_mass": torch.zeros((), device=r_w.device),
    }
    if weights is not None:
        rows = r_w.shape[0]
        if weights.ndim != 2 or weights.shape[0] != rows or column_offset + rows > weights.shape[1]:
            raise ValueError(
                f"weights of shape {list(weights.shape)} do not hold the diagonal of {rows} pairs "
                f"starting at column {column_offset}"
            )
        weights = weights.float()
        own = weights[:, column_offset : column_offset + rows].diagonal()
        metrics["off_diagonal_mass"] = (weights.sum(dim=1) - own).mean()
    return metrics


# ------------------------------------------------------------------------------------ the global batch


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_concat(x: Tensor) -> Tensor:
    """Every rank's x concatenated along dim 0 in rank order, without autograd. Shapes must match."""
    _, world_size = _world()
    # Check shapes first: all_gather with unequal sizes hangs or fails deep inside the backend.
    shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        per_rank = ", ".join(f"rank {r}: {s.tolist()}" for r, s in enumerate(shapes))
        raise ValueError(
            f"all_gather_with_grad needs the same tensor shape on every rank, got {per_rank}; give every "
            "data-parallel worker the same per-worker batch size (e.g. drop the last incomplete batch)"
        )
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate all ranks' x. Backward: all-reduce SUM of the gradient, keep this rank's rows.

    Every rank's loss may depend on every rank's x, so the gradient of the SUM of all ranks' losses with
    respect to this rank's x is the sum over ranks of their gradients for this rank's slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, _ = _world()
        ctx.rows = x.shape[0]
        return _all_gather_concat(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every data-parallel rank's x along dim 0 (rank order), keeping the autograd graph.

    Uses the default process group, which must be the data-parallel group. Identity when torch.distributed
    is not initialised or the world size is 1. Every rank must pass the same
    shape (checked; a ValueError on every rank otherwise) and every rank must call it (it is a collective,
    and so is its backward).
    """
    _, world_size = _world()
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def rpo_loss_global(
    model_mse_w: Tensor,
    model_mse_l: Tensor,
    ref_mse_w: Tensor,
    ref_mse_l: Tensor,
    text_emb: Tensor,
    image_emb_w: Tensor,
    image_emb_l: Tensor,
    *,
    beta: float,
    alpha: float,
    tau: float,
    s_text: Tensor | None = None,
    s_image: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This rank's share of the RPO loss over the global batch of all data-parallel ranks, and its metrics.

    Each rank holds B local pairs; the global batch has N = world_size * B. This rank computes the rows of
    its own winners against the losers of ALL ranks: the losers' rewards are all-gathered with gradient,
    the text and loser-image embeddings with them but without (they are constants), and the weights are
    [B, N]. The returned loss is the mean over these B rows and N columns. Without torch.distributed (or with
    one rank) this is exactly `rpo_loss(..., similarity_weights(...))`.

    Why data-parallel training then gets the single-process gradient of `rpo_loss` on the concatenated batch:
    let L be that single-process loss, (1/N^2) * sum over all N x N terms, and L_k this rank's loss,
    (1/(B N)) * sum over its B x N terms. Then sum_k L_k = W * L (W = world size): the ranks' losses
    average to L. The gradient reaching this rank's rewards is the gradient of sum_k L_k: directly for
    r_w (its rows live only here), and for r_l through the all-gather's backward, which all-reduce SUMs
    the gradients that every rank's loss sends to this rank's columns. So every input gradient on every
    rank is W times the single-process one, and so is each rank's parameter gradient (W times the
    contribution of its own samples). DDP and DeepSpeed AVERAGE gradients over ranks, dividing by W:
    (1/W) * sum_k W * g_k = sum_k g_k, the single-process gradient. Do not rescale the loss by W.
    (The winners need no gather: each row is owned by exactly one rank.)

    Metrics cover this rank's B pairs, their own losers being global columns rank * B + i.

    ``s_text``, ``s_image`` [B, N]: this rank's rows of the global batch's similarity matrices, columns in rank
    order (a batch plan's stored matrices); given, they replace the ones computed from the embeddings, and only the
    rewards are gathered.
    """
    rank, _ = _world()
    r_w = implicit_rewards(model_mse_w, ref_mse_w, beta=beta)
    r_l = implicit_rewards(model_mse_l, ref_mse_l, beta=beta)
    _check_vector("model_mse_l", model_mse_l, r_w.shape[0])
    # One collective for the three column quantities: [r_l | text | image_l] packed side by side. Only the
    # reward column carries gradient (the embeddings are detached constants).
    if s_text is not None and s_image is not None:
        r_l_all = all_gather_with_grad(r_l[:, None])
        if s_text.shape != (r_w.shape[0], r_l_all.shape[0]):
            raise ValueError(f"stored similarity rows have shape {list(s_text.shape)}, the global batch needs "
                             f"[{r_w.shape[0]}, {r_l_all.shape[0]}]: the batch plan was built for another global batch")
        weights = weights_from_similarities(s_text, s_image, alpha=alpha, tau=tau)
    else:
        text, image_l = text_emb.detach().to(r_l.dtype), image_emb_l.detach().to(r_l.dtype)
        columns = all_gather_with_grad(torch.cat([r_l[:, None], text, image_l], dim=1))
        r_l_all, text_all, image_l_all = columns.split([1, text.shape[1], image_l.shape[1]], dim=1)
        weights = _weights_for_rows(text_emb.detach(), image_emb_w.detach(), text_all, image_l_all,
                                    alpha=alpha, tau=tau)
    loss = rpo_terms(r_w, r_l_all[:, 0], weights).mean()
    metrics = preference_metrics(r_w, r_l, weights, column_offset=rank * r_w.shape[0])
    return loss, metrics
