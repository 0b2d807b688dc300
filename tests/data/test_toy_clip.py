import json

import torch
import torch.nn.functional as F

from pipeline.data.toy_clip import ToyClipSettings, contrastive_loss, toy_scene_renders


def test_contrastive_loss_prefers_matching_scenes_over_shuffled_ones():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    same = torch.eye(6)
    matched = torch.cat([text, text])  # both styles of scene i embed like caption i
    shuffled = matched[torch.randperm(12)]
    scale = torch.tensor(20.0)
    assert contrastive_loss(matched, text, same, scale) < 0.2 * contrastive_loss(shuffled, text, same, scale)


def test_renders_are_seeded_and_one_per_style():
    a, ra = toy_scene_renders(scenes=2, resolution=32, seed=5)
    b, rb = toy_scene_renders(scenes=2, resolution=32, seed=5)
    assert a == b and len(ra[0]) == 3 and ra[0][1].tobytes() == rb[0][1].tobytes()
    assert ToyClipSettings().tag() != ToyClipSettings(steps=1).tag()


def test_the_default_toy_clip_is_the_shipped_fit(tmp_path, capsys):
    from pipeline.data.toy import ASSETS, state_digest
    from pipeline.data.toy_clip import toy_clip_weights

    weights = toy_clip_weights(tmp_path)
    assert "the fit shipped in pipeline/assets/" in capsys.readouterr().out
    record = json.loads((ASSETS / weights.name).with_suffix(".json").read_text())
    assert state_digest(torch.load(weights, weights_only=True)) == record["weights"]
    assert toy_clip_weights(tmp_path) == weights  # cached: the second call reads nothing new
