import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from pipeline.models.clip import TINY_OPEN_CLIP_NAME, ClipEmbedder, open_clip_build

TEXTS = ["a sketch of a cat", "an oil painting of a harbour", ""]


def _images() -> list[Image.Image]:
    # Different sizes and modes: the model's own preprocessing resizes, crops and converts.
    return [Image.new("RGB", (64, 48), "red"), Image.new("L", (20, 90), 200), Image.new("RGBA", (32, 32), "blue")]


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder("tiny", "random")


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
    other = ClipEmbedder("tiny", "random")
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
    assert embedder.identity == {"name": "tiny", "pretrained": "random", "sha256": embedder.identity["sha256"]}


# ------------------------------------------------------------------------------------------ which weights


def test_random_weights_are_never_a_fallback_but_must_be_said():
    with pytest.raises(ValueError, match=r"no weights named for CLIP 'tiny'.*pretrained tag.*weights file.*\"random\""):
        ClipEmbedder("tiny")
    with pytest.raises(ValueError, match=r"'nowhere\.pt' for 'tiny': neither a pretrained tag of it nor a file"):
        ClipEmbedder("tiny", "nowhere.pt")
    with pytest.raises(ValueError, match="'ViT-Nope' is not an open_clip model"):
        ClipEmbedder("ViT-Nope", "random")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_file_is_refused_with_the_file_to_give(tmp_path):
    # OpenAI's ViT-L-14.pt is a TorchScript archive; a scripted module saved the same way stands in for it.
    archive = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    with pytest.raises(ValueError) as caught:
        ClipEmbedder("tiny", str(archive))
    message = str(caught.value)
    assert str(archive) in message and "TorchScript" in message and "'openai'" in message
    assert "open_clip-format state dict" in message


# ------------------------------------------------------------------------------------------ QuickGELU


def _activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


@pytest.mark.parametrize("name, tag, activation", [
    ("ViT-L-14", "openai", "QuickGELU"),  # the aesthetic predictor's backbone
    ("ViT-B-32", "openai", "QuickGELU"),
    ("ViT-B-32", "laion400m_e31", "QuickGELU"),  # an early LAION run, trained with QuickGELU too
    ("ViT-L-14", "laion2b_s32b_b82k", "GELU"),
    ("ViT-H-14", "laion2b_s32b_b79k", "GELU"),  # the SDXL configs' CLIP and HPSv2's base
    ("ViT-L-14-quickgelu", "openai", "QuickGELU"),
])
def test_the_architecture_has_the_activation_its_weights_were_trained_with(name, tag, activation):
    build = open_clip_build(name, tag)
    assert (build.open_clip_name, build.pretrained) == (name, tag)
    # Built from the decision without weights (on the meta device: no memory, no download).
    with torch.device("meta"):
        model = open_clip.create_model(build.open_clip_name, pretrained=None, force_quick_gelu=build.quick_gelu,
                                       device="meta")
    assert _activations(model) == {activation}


def test_files_and_random_weights_get_the_architecture_as_named(tmp_path):
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")  # only the decision is asked for here
    assert not open_clip_build("ViT-L-14", str(weights)).quick_gelu
    assert open_clip_build("ViT-L-14-quickgelu", str(weights)).quick_gelu  # how OpenAI weights in a file are named
    assert not open_clip_build("ViT-L-14", "random").quick_gelu


def test_the_embedder_builds_a_tags_activation_and_loads_its_weights(embedder, tmp_path, monkeypatch):
    """Two tags of the tiny model in open_clip's table, one trained with QuickGELU: the embedder builds each with its
    activation (no download: a table entry may name a local file)."""
    weights = tmp_path / "tiny.pt"
    torch.save(embedder.model.state_dict(), weights)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_OPEN_CLIP_NAME, {
        "like_openai": {"file": str(weights), "quick_gelu": True}, "like_laion": {"file": str(weights)}})
    quick, plain = ClipEmbedder("tiny", "like_openai"), ClipEmbedder("tiny", "like_laion")
    assert _activations(quick.model) == {"QuickGELU"} and quick.quick_gelu
    assert _activations(plain.model) == {"GELU"} and not plain.quick_gelu
    assert quick.identity["sha256"] == plain.identity["sha256"] == embedder.identity["sha256"]  # the file's tensors
    assert quick.identity["pretrained"] == "like_openai"
    assert not torch.allclose(quick.embed_texts(TEXTS), plain.embed_texts(TEXTS))  # same weights, other activation


def test_random_weights_asked_for_by_name_print_no_warning(caplog):
    """open_clip's "initialized randomly" warning was the default job's hint that its CLIP was random by accident."""
    import logging

    with caplog.at_level(logging.WARNING):
        ClipEmbedder("tiny", "random")
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
