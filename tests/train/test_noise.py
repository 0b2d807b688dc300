import torch

from pipeline.train.noise import draw, pair_seed


def _draw(ids, step=3, micro=0, dropout=0.0):
    return draw(ids, seed=7, step=step, micro_step=micro, latent_shape=(4, 8, 8), num_train_timesteps=1000,
                prompt_dropout=dropout)


def test_draws_depend_only_on_seed_step_and_pair():
    a = _draw(["p1", "p2", "p3"])
    b = _draw(["p3", "p1"])  # another batch composition, e.g. another worker count
    assert torch.equal(a.noise[0], b.noise[1]) and torch.equal(a.noise[2], b.noise[0])
    assert a.timesteps[0] == b.timesteps[1]
    assert a.noise.shape == (3, 4, 8, 8) and a.timesteps.dtype == torch.int64


def test_draws_change_with_step_micro_step_and_pair():
    base = _draw(["p1", "p2"])
    assert not torch.equal(base.noise[0], base.noise[1])
    assert not torch.equal(base.noise, _draw(["p1", "p2"], step=4).noise)
    assert not torch.equal(base.noise, _draw(["p1", "p2"], micro=1).noise)
    assert pair_seed(0, 1, 0, "x") != pair_seed(1, 1, 0, "x")


def test_prompt_dropout_rate():
    ids = [f"pair{i}" for i in range(2000)]
    assert not _draw(ids, dropout=0.0).drop_prompt.any()
    rate = _draw(ids, dropout=0.25).drop_prompt.float().mean().item()
    assert 0.2 < rate < 0.3
