"""PickScore v1 (Kirstain et al. 2023): a CLIP-H model in transformers' format, fine-tuned on Pick-a-Pic.

As published (yuvalkirstain/PickScore README): `CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")` with the
processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; score = logit_scale.exp() * cos(image_embeds, text_embeds)
(about 20-23 for good images).

The processor is always the backbone's (``evaluate.pickscore.backbone``: a folder or hub id, default the laion one),
never processor files that lie beside the weights: those may be anyone's, and the model was trained on the laion
processor's pixels. Its images are resized with PIL bicubic (CLIPImageProcessorPil), as transformers 4 did for the
published code; transformers 5's default CLIP image processor resizes with torchvision, giving other pixels.

In transformers 5 `get_image_features` / `get_text_features` return an output
object whose `pooler_output` holds the projected embeddings (a tensor in 4.x): `_projected` takes either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.evaluate.scorer_weights import not_found, resolve_folder
from pipeline.evaluate.scorers import check_batch, seeded

SOURCE = "the Hugging Face hub repo yuvalkirstain/PickScore_v1 (a CLIPModel folder; hub id yuvalkirstain/PickScore_v1)"
PROCESSOR_SOURCE = ("the processor files (preprocessor_config.json, tokenizer files) of the hub repo "
                    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
PUBLISHED_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_TOKENS = 77
# PickScore_v1's config.json (laion's CLIP-ViT-H-14: its 986M parameters, open_clip's ViT-H-14 in transformers'
# layout), so the published architecture can be built without the hub; fields left out are CLIPConfig's defaults.
PUBLISHED_CONFIG = {
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
    "projection_dim": 1024,
}


def load_processor(backbone: str | None):
    """The backbone's CLIP processor: PIL bicubic image processing and its tokenizer (see the module docstring)."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    folder = resolve_folder(backbone or PUBLISHED_PROCESSOR, scorer="pickscore", source=PROCESSOR_SOURCE,
                            key="backbone", allow_patterns=["*.json", "*.txt"])  # not the 4 GB of CLIP-H weights
    try:
        return CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True),
                             tokenizer=CLIPTokenizer.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError) as err:
        raise not_found("pickscore", str(folder), source=PROCESSOR_SOURCE, key="backbone",
                        why=str(err).splitlines()[0]) from err


def clip_model_on_meta(folder: Path | None = None):
    """The CLIPModel of ``folder``'s config.json (None: the published one) on the meta device: its parameter names
    and shapes, with no memory, in well under a second."""
    from transformers import CLIPConfig, CLIPModel

    config = (CLIPConfig(**PUBLISHED_CONFIG) if folder is None
              else CLIPConfig.from_pretrained(folder, local_files_only=True))
    with torch.device("meta"):
        return CLIPModel(config)


def is_old_buffer(key: str) -> bool:
    """position_ids: a buffer transformers 4 saved and 5 no longer keeps; files that have it load as well."""
    return key.endswith("position_ids")


def misfit(folder, missing: list[str], unexpected: list[str], mismatched: list[str]) -> ValueError:
    return ValueError(
        f"pickscore scorer: the weights in {folder} do not fit a CLIPModel: missing keys {missing[:3]}, "
        f"unexpected keys {unexpected[:3]}, wrong shapes {mismatched[:3]}. Expected {SOURCE}; set "
        f"evaluate.pickscore.weights to that folder."
    )


def _projected(output) -> torch.Tensor:
    """The projected embeddings from get_*_features: a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScoreScorer:
    name = "pickscore"

    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def load(cls, *, weights: str | None = None, backbone: str | None = None, device: str = "cpu") -> "PickScoreScorer":
        from transformers import CLIPModel

        folder = resolve_folder(weights, scorer="pickscore", source=SOURCE)
        processor = load_processor(backbone)  # before the 4 GB of weights, so a missing processor fails fast
        try:
            model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                    dtype=torch.float32)
        except OSError as err:  # a folder without config.json / weights
            raise not_found("pickscore", str(folder), source=SOURCE, why=str(err).splitlines()[0]) from err
        except (RuntimeError, ValueError) as err:  # tensors whose shapes do not fit the folder's config
            raise ValueError(f"pickscore scorer: the weights in {folder} do not fit its config.json: {err}. "
                             f"Expected {SOURCE}; set evaluate.pickscore.weights to that folder.") from err
        # from_pretrained would fill missing tensors with random values and carry on: refuse instead.
        missing = sorted(info["missing_keys"])
        unexpected = sorted(k for k in info["unexpected_keys"] if not is_old_buffer(k))
        mismatched = sorted(str(k) for k in info["mismatched_keys"])
        if missing or unexpected or mismatched:
            raise misfit(folder, missing, unexpected, mismatched)
        return cls(model.to(device), processor, device)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        check_batch(self.name, images, prompts)
        if not images:
            return np.zeros(0, dtype=np.float64)
        image_inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        text_inputs = self.processor(text=list(prompts), padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt")
        pixels = image_inputs["pixel_values"].to(self.device)
        image_embeds = _projected(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _projected(self.model.get_text_features(**{k: v.to(self.device) for k, v in text_inputs.items()}))
        cosine = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
        return (self.model.logit_scale.exp().float() * cosine).double().cpu().numpy()


def save_tiny_pickscore(out_dir: Path) -> dict:
    """A tiny CLIPModel folder (save_pretrained) with CLIP's full 49,408-token vocabulary, and beside it, as its
    backbone, a processor folder like laion's (32 px images), made offline: the tokenizer from open_clip's BPE file
    (as pipeline/models/tiny.py does)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipeline.models.tiny import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE, write_clip_vocab

    folder, processor_folder = out_dir / "PickScore_v1_tiny", out_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K_tiny"
    write_clip_vocab(processor_folder)
    tokenizer = CLIPTokenizer.from_pretrained(processor_folder, model_max_length=MAX_TOKENS, pad_token=EOS_TOKEN)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_folder)
    (processor_folder / "tokenizer.json").unlink(missing_ok=True)  # 3.6 MB; vocab.json + merges.txt rebuild it
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab[BOS_TOKEN],
                         eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    seeded(lambda: CLIPModel(config), seed=5).save_pretrained(folder)
    return {"weights": str(folder), "backbone": str(processor_folder), "arch": None}
