import pytest
import torch
from PIL import Image

from pipeline.models.clip import ClipEmbedder

TEXTS = ["a sketch of a cat", "an oil painting of a harbour", ""]


def _images() -> list[Image.Image]:
    # Different sizes and modes: the model's own preprocessing resizes, crops and converts.
    return [Image.new("RGB", (64, 48), "red"), Image.new("L", (20, 90), 200), Image.new("RGBA", (32, 32), "blue")]


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder("tiny")


def test_embeddings_are_normalised_float32_rows(embedder):
    texts, images = embedder.embed_texts(TEXTS), embedder.embed_images(_images())
    for embeddings in (texts, images):
        assert embeddings.shape == (3, 32) and embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
        assert not embeddings.requires_grad
        assert torch.cdist(embeddings, embeddings)[~torch.eye(3, dtype=torch.bool)].min() > 1e-3  # rows differ


def test_tiny_model_is_the_same_in_every_instance_and_leaves_the_rng_alone(embedder):
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    other = ClipEmbedder("tiny")
    assert torch.equal(torch.rand(1), expected_draw)
    assert other.identity == embedder.identity
    assert torch.equal(other.embed_texts(TEXTS), embedder.embed_texts(TEXTS))
    assert torch.equal(other.embed_images(_images()), embedder.embed_images(_images()))


def test_weights_file_is_loaded_and_changes_the_identity(embedder, tmp_path):
    weights = {name: tensor.clone() for name, tensor in embedder.model.state_dict().items()}
    weights["text_projection"] = weights["text_projection"].flip(0)
    weights_file = tmp_path / "clip.pt"
    torch.save(weights, weights_file)
    loaded = ClipEmbedder("tiny", str(weights_file))
    assert loaded.identity["pretrained"] == str(weights_file)
    assert loaded.identity["sha256"] != embedder.identity["sha256"]
    assert not torch.allclose(loaded.embed_texts(TEXTS), embedder.embed_texts(TEXTS))
    torch.testing.assert_close(loaded.embed_images(_images()), embedder.embed_images(_images()))  # image side kept
    assert embedder.identity == {"name": "tiny", "pretrained": None, "sha256": embedder.identity["sha256"]}
