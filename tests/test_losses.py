"""Tests of pipeline/losses.py in one process (the 2-rank tests are in test_losses_distributed.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    all_gather_with_grad,
    cosine_similarity_matrix,
    dpo_loss,
    implicit_rewards,
    preference_metrics,
    rpo_loss,
    rpo_loss_global,
    rpo_terms,
    sft_loss,
    similarity_weights,
    weights_from_similarities,
)


def random_batch(batch: int, dim: int = 6, *, dtype=torch.float64, seed: int = 0, mse_scale: float = 0.2):
    """MSEs near each other (as in training: policy close to reference) and unnormalised embeddings."""
    g = torch.Generator().manual_seed(seed)
    mse = [mse_scale + 0.05 * torch.rand(batch, generator=g, dtype=torch.float64) for _ in range(4)]
    emb = [torch.randn(batch, dim, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    return [t.to(dtype) for t in mse], [t.to(dtype) for t in emb]


# ------------------------------------------------------------------------------------ hand-worked 2x2


def test_hand_worked_2x2_example():
    """beta = 2 (so r = -(model_mse - ref_mse)), alpha = 0.5, tau = 0.5.

    model_mse_w = [0.1, 0.3], ref_mse_w = [0.2, 0.2]  ->  r_w = [ 0.1, -0.1]
    model_mse_l = [0.4, 0.2], ref_mse_l = [0.2, 0.3]  ->  r_l = [-0.2,  0.1]
    z[i][j] = r_w[i] - r_l[j] = [[0.3, 0.0], [0.1, -0.2]]

    text t0 = (2, 0), t1 = (3, 4)              -> cos_text  = [[1, 0.6], [0.6, 1]]
    winners v0 = (1, 0), v1 = (0, 1); losers u0 = (1, 0), u1 = (3, 4)
                                               -> cos_image = [[1, 0.6], [0, 0.8]]
    S = 0.5 cos_text + 0.5 cos_image = [[1, 0.6], [0.3, 0.9]]
    logits -(1 - S)/0.5 = [[0, -0.8], [-1.4, -0.2]]
    w row 0 = [sigmoid(0.8), sigmoid(-0.8)]  = [0.6899744811, 0.3100255189]
    w row 1 = [sigmoid(-1.2), sigmoid(1.2)]  = [0.2314752165, 0.7685247835]
    terms log(1 + exp(-w z)):
        [[log(1 + exp(-0.6899744811 * 0.3)), log 2                            ],
         [log(1 + exp(-0.2314752165 * 0.1)), log(1 + exp(0.7685247835 * 0.2))]]
      = [[0.5949972032, 0.6931471806], [0.6816403942, 0.7729499082]]
    RPO loss = mean = 0.6856836715
    DPO loss = (log(1 + exp(-0.3)) + log(1 + exp(0.2))) / 2 = 0.6762470569
    """
    model_w, ref_w = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])
    model_l, ref_l = torch.tensor([0.4, 0.2]), torch.tensor([0.2, 0.3])
    text = torch.tensor([[2.0, 0.0], [3.0, 4.0]])
    image_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image_l = torch.tensor([[1.0, 0.0], [3.0, 4.0]])

    torch.testing.assert_close(implicit_rewards(model_w, ref_w, beta=2.0), torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(implicit_rewards(model_l, ref_l, beta=2.0), torch.tensor([-0.2, 0.1]))
    weights = similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.5)
    expected_weights = torch.tensor([[0.6899744811, 0.3100255189], [0.2314752165, 0.7685247835]])
    torch.testing.assert_close(weights, expected_weights)
    r_w, r_l = implicit_rewards(model_w, ref_w, beta=2.0), implicit_rewards(model_l, ref_l, beta=2.0)
    expected_terms = torch.tensor([[0.5949972032, 0.6931471806], [0.6816403942, 0.7729499082]])
    torch.testing.assert_close(rpo_terms(r_w, r_l, weights), expected_terms)
    loss = rpo_loss(model_w, model_l, ref_w, ref_l, weights, beta=2.0)
    assert loss.item() == pytest.approx(0.6856836715, abs=1e-6)
    assert dpo_loss(model_w, model_l, ref_w, ref_l, beta=2.0).item() == pytest.approx(0.6762470569, abs=1e-6)


# ----------------------------------------------------------------------------- float64 naive reference


def naive_rpo(mse_w, mse_l, ref_w, ref_l, text, image_w, image_l, *, beta, alpha, tau):
    """RPO with plain Python floats and loops: no function of pipeline.losses."""
    batch = len(mse_w)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    r_w = [-(beta / 2) * (mse_w[i] - ref_w[i]) for i in range(batch)]
    r_l = [-(beta / 2) * (mse_l[j] - ref_l[j]) for j in range(batch)]
    weights, total = [], 0.0
    for i in range(batch):
        similarity = [alpha * cos(text[i], text[j]) + (1 - alpha) * cos(image_w[i], image_l[j]) for j in range(batch)]
        logits = [-(1 - s) / tau for s in similarity]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        row = [e / sum(exps) for e in exps]
        weights.append(row)
        for j in range(batch):
            x = row[j] * (r_w[i] - r_l[j])
            total += -math.log(1 / (1 + math.exp(-x)))
    return total / batch**2, weights


def test_rpo_matches_naive_float64_reference():
    (mse_w, mse_l, ref_w, ref_l), (text, image_w, image_l) = random_batch(5, seed=1)
    beta, alpha, tau = 40.0, 0.3, 0.2
    expected_loss, expected_weights = naive_rpo(
        *(t.tolist() for t in (mse_w, mse_l, ref_w, ref_l, text, image_w, image_l)), beta=beta, alpha=alpha, tau=tau
    )
    weights = similarity_weights(text, image_w, image_l, alpha=alpha, tau=tau)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor(expected_weights, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    loss = rpo_loss(mse_w, mse_l, ref_w, ref_l, weights, beta=beta)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)


# --------------------------------------------------------------------------------------- DPO and SFT


def test_dpo_matches_diffusion_dpo_reference_formula():
    (mse_w, mse_l, ref_w, ref_l), _ = random_batch(16, seed=2)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m_w, m_l, r_w, r_l = (t.to(dtype) for t in (mse_w, mse_l, ref_w, ref_l))
        for beta in (1.0, 5000.0):
            reference = -F.logsigmoid(-0.5 * beta * ((m_w - m_l) - (r_w - r_l))).mean()
            torch.testing.assert_close(dpo_loss(m_w, m_l, r_w, r_l, beta=beta), reference, rtol=tol, atol=tol)


def test_dpo_beta_5000_is_finite_and_linear_in_a_large_gap():
    # inside = -0.5 * 5000 * ((0.9 - 0.1) - 0) = -2000: log(sigmoid(-2000)) underflows to -inf, logsigmoid does not.
    m_w, m_l = torch.tensor([0.9], requires_grad=True), torch.tensor([0.1], requires_grad=True)
    ref = torch.tensor([0.5])
    loss = dpo_loss(m_w, m_l, ref, ref, beta=5000.0)
    loss.backward()
    assert loss.item() == pytest.approx(2000.0)
    assert m_w.grad.item() == pytest.approx(2500.0) and m_l.grad.item() == pytest.approx(-2500.0)


def test_sft_loss_is_the_winners_mean_mse():
    assert sft_loss(torch.tensor([0.2, 0.4, 0.9])).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------- weight properties


def test_identity_weights_diagonal_terms_are_dpo_per_pair_terms():
    """With weights = I: term[i][i] = DPO's term of pair i, term[i][j != i] = -logsigmoid(0) = log 2, so
    rpo_loss = dpo_loss / B + (1 - 1/B) * log 2."""
    batch, beta = 6, 5000.0
    (mse_w, mse_l, ref_w, ref_l), _ = random_batch(batch, seed=3, mse_scale=0.1)
    r_w, r_l = implicit_rewards(mse_w, ref_w, beta=beta), implicit_rewards(mse_l, ref_l, beta=beta)
    terms = rpo_terms(r_w, r_l, torch.eye(batch, dtype=torch.float64))
    per_pair_dpo = torch.stack(
        [dpo_loss(*(t[i : i + 1] for t in (mse_w, mse_l, ref_w, ref_l)), beta=beta) for i in range(batch)]
    )
    torch.testing.assert_close(terms.diagonal(), per_pair_dpo)
    off_diagonal = terms[~torch.eye(batch, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, math.log(2)))
    loss = rpo_loss(mse_w, mse_l, ref_w, ref_l, torch.eye(batch, dtype=torch.float64), beta=beta)
    expected = dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=beta) / batch + (1 - 1 / batch) * math.log(2)
    torch.testing.assert_close(loss, expected)


def test_weight_rows_sum_to_one():
    _, (text, image_w, image_l) = random_batch(7, seed=4)
    for tau in (1e-3, 0.1, 10.0):
        weights = similarity_weights(text, image_w, image_l, alpha=0.5, tau=tau)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(7, dtype=torch.float64))


def test_small_tau_gives_one_hot_rows_on_the_most_similar_column():
    _, (text, image_w, image_l) = random_batch(6, seed=5)
    alpha = 0.4
    similarity = alpha * cosine_similarity_matrix(text, text) + (1 - alpha) * cosine_similarity_matrix(image_w, image_l)
    weights = similarity_weights(text, image_w, image_l, alpha=alpha, tau=1e-5)
    one_hot = F.one_hot(similarity.argmax(dim=1), 6).to(weights.dtype)
    torch.testing.assert_close(weights, one_hot, rtol=0, atol=1e-6)


def test_alpha_one_ignores_images():
    _, (text, image_w, image_l) = random_batch(5, seed=6)
    _, (_, other_w, other_l) = random_batch(5, seed=7)
    first = similarity_weights(text, image_w, image_l, alpha=1.0, tau=0.1)
    second = similarity_weights(text, other_w, other_l, alpha=1.0, tau=0.1)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.1))


def test_symmetric_similarity_when_images_equal_texts():
    """With v_w = v_l = t, S = cos(t_i, t_j) is symmetric and S_ii = 1, so w_ij / w_ii = exp(-(1 - S_ij)/tau)
    is symmetric too (the row normalisers cancel)."""
    _, (text, _, _) = random_batch(5, seed=8)
    similarity = cosine_similarity_matrix(text, text)
    torch.testing.assert_close(similarity, similarity.T)
    weights = similarity_weights(text, text, text, alpha=0.3, tau=0.2)
    relative = weights / weights.diagonal()[:, None]
    torch.testing.assert_close(relative, relative.T)
    assert not torch.allclose(weights, weights.T)  # the weights themselves are row-normalised, not symmetric


def test_permuting_pairs_permutes_weights_and_keeps_the_loss():
    (mse_w, mse_l, ref_w, ref_l), (text, image_w, image_l) = random_batch(6, seed=9)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    weights = similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.1)
    permuted = similarity_weights(text[perm], image_w[perm], image_l[perm], alpha=0.5, tau=0.1)
    torch.testing.assert_close(permuted, weights[perm][:, perm])
    loss = rpo_loss(mse_w, mse_l, ref_w, ref_l, weights, beta=50.0)
    permuted_loss = rpo_loss(mse_w[perm], mse_l[perm], ref_w[perm], ref_l[perm], permuted, beta=50.0)
    torch.testing.assert_close(permuted_loss, loss)


def test_precomputed_similarities_give_the_same_weights():
    _, (text, image_w, image_l) = random_batch(4, seed=10)
    direct = similarity_weights(text, image_w, image_l, alpha=0.7, tau=0.05)
    from_plan = weights_from_similarities(
        cosine_similarity_matrix(text, text), cosine_similarity_matrix(image_w, image_l), alpha=0.7, tau=0.05
    )
    torch.testing.assert_close(from_plan, direct)


def test_bad_arguments_are_clear_errors():
    _, (text, image_w, image_l) = random_batch(3, seed=11)
    with pytest.raises(ValueError, match="loss.tau"):
        similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.0)
    with pytest.raises(ValueError, match="loss.alpha"):
        similarity_weights(text, image_w, image_l, alpha=1.5, tau=0.1)
    mse = torch.rand(3)
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        rpo_loss(mse, mse, mse, mse, torch.eye(2), beta=1.0)


# ------------------------------------------------------------------------------------------ gradcheck


def test_gradcheck_rpo_loss_float64():
    (mse_w, mse_l, ref_w, ref_l), (text, image_w, image_l) = random_batch(4, seed=12)
    weights = similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.3)
    inputs = tuple(t.clone().requires_grad_() for t in (mse_w, mse_l, ref_w, ref_l, weights))
    assert torch.autograd.gradcheck(lambda *xs: rpo_loss(*xs, beta=8.0), inputs)


def test_gradcheck_rectangular_rpo_loss_float64():
    (mse_w, _, ref_w, _), _ = random_batch(2, seed=13)
    (_, mse_l, _, ref_l), _ = random_batch(5, seed=14)
    weights = torch.softmax(torch.randn(2, 5, dtype=torch.float64), dim=1)
    inputs = tuple(t.clone().requires_grad_() for t in (mse_w, mse_l, ref_w, ref_l, weights))
    assert torch.autograd.gradcheck(lambda *xs: rpo_loss(*xs, beta=8.0), inputs)


def test_gradcheck_similarity_weights_float64():
    _, (text, image_w, image_l) = random_batch(4, dim=3, seed=15)
    inputs = tuple(t.clone().requires_grad_() for t in (text, image_w, image_l))
    assert torch.autograd.gradcheck(lambda *xs: similarity_weights(*xs, alpha=0.6, tau=0.5), inputs)


# ---------------------------------------------------------------------------------- extreme numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_loss_and_grads_at_beta_1e4_and_tau_1e3(dtype):
    # MSE gaps up to 0.9 make beta/2 * gap ~ 4500: sigmoid saturates completely in both directions.
    g = torch.Generator().manual_seed(16)
    mse = [(torch.rand(8, generator=g)).to(dtype).requires_grad_() for _ in range(4)]
    emb = [torch.randn(8, 16, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    weights = similarity_weights(*emb, alpha=0.5, tau=1e-3)
    assert weights.dtype == torch.float32  # softmax in float32 even for bf16 embeddings
    losses = {
        "rpo": rpo_loss(*mse, weights, beta=1e4),
        "dpo": dpo_loss(*mse, beta=1e4),
        "rpo_global": rpo_loss_global(*mse, *emb, beta=1e4, alpha=0.5, tau=1e-3)[0],
    }
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        grads = torch.autograd.grad(loss, [*mse, *emb], allow_unused=True)
        for grad in grads:
            assert grad is None or torch.isfinite(grad).all(), name
    assert all(t.grad is None for t in mse)  # autograd.grad, not backward: nothing accumulated


# ---------------------------------------------------------------------------- metrics, single process


def test_preference_metrics():
    r_w, r_l = torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.5, 0.5, 1.0, -2.0])
    weights = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]
    )
    # pair i's own loser is column i + 1 (a rank's rows of a global matrix): 0.1, 1.0, 0.5, 0.2
    metrics = preference_metrics(r_w, r_l, weights, column_offset=1)
    assert metrics["implicit_accuracy"].item() == pytest.approx(0.75)
    assert metrics["reward_margin"].item() == pytest.approx((0.5 - 0.5 + 1.0 + 1.0) / 4)
    assert metrics["off_diagonal_mass"].item() == pytest.approx((0.9 + 0.0 + 0.5 + 0.8) / 4)
    assert preference_metrics(r_w, r_l, torch.eye(4))["off_diagonal_mass"].item() == 0.0
    assert preference_metrics(r_w, r_l, torch.full((4, 4), 0.25))["off_diagonal_mass"].item() == pytest.approx(0.75)
    assert preference_metrics(r_w, r_l)["off_diagonal_mass"].item() == 0.0


def test_global_loss_without_distributed_is_the_plain_rpo_loss():
    (mse_w, mse_l, ref_w, ref_l), (text, image_w, image_l) = random_batch(5, seed=17)
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
    loss, metrics = rpo_loss_global(mse_w, mse_l, ref_w, ref_l, text, image_w, image_l, beta=30.0, alpha=0.5, tau=0.1)
    weights = similarity_weights(text, image_w, image_l, alpha=0.5, tau=0.1)
    torch.testing.assert_close(loss, rpo_loss(mse_w, mse_l, ref_w, ref_l, weights, beta=30.0))
    expected = preference_metrics(
        implicit_rewards(mse_w, ref_w, beta=30.0), implicit_rewards(mse_l, ref_l, beta=30.0), weights
    )
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value)


def test_global_loss_with_stored_similarity_rows_is_the_loss_from_the_embeddings():
    """A batch plan's stored S_text / S_image give the loss and gradient computed from the embeddings; a stored
    matrix of another global batch size is refused."""
    (mse_w, mse_l, ref_w, ref_l), (text, image_w, image_l) = random_batch(5, seed=23)
    mse_w = mse_w.clone().requires_grad_(True)
    from_embeddings, _ = rpo_loss_global(mse_w, mse_l, ref_w, ref_l, text, image_w, image_l,
                                         beta=30.0, alpha=0.3, tau=0.2)
    (expected_grad,) = torch.autograd.grad(from_embeddings, mse_w)
    s_text, s_image = cosine_similarity_matrix(text, text), cosine_similarity_matrix(image_w, image_l)
    stored, _ = rpo_loss_global(mse_w, mse_l, ref_w, ref_l, text, image_w, image_l, beta=30.0, alpha=0.3, tau=0.2,
                                s_text=s_text, s_image=s_image)
    torch.testing.assert_close(stored, from_embeddings)
    torch.testing.assert_close(torch.autograd.grad(stored, mse_w)[0], expected_grad)
    with pytest.raises(ValueError, match="batch plan was built for another global batch"):
        rpo_loss_global(mse_w, mse_l, ref_w, ref_l, text, image_w, image_l, beta=30.0, alpha=0.3, tau=0.2,
                        s_text=s_text[:, :4], s_image=s_image[:, :4])
