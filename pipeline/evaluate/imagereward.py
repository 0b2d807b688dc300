"""ImageReward (Xu et al., 2023, THUDM/ImageReward): a BLIP image-text encoder with an MLP reward head.

    scorer = ImageRewardScorer.load(weights="/models/ImageReward",     # folder with ImageReward.pt (+ med_config.json)
                                    backbone="/models/bert-base-uncased")  # tokenizer folder; None = hub id
    scorer.score(images, prompts)                                       # float64 [N], one reward per image

The architecture, written here in plain torch from the published code (ImageReward/ImageReward.py and
models/BLIP/{blip,blip_pretrain,med,vit}.py of github.com/THUDM/ImageReward):
  image -> resize 224 (bicubic), centre crop, RGB, ToTensor, Normalize(CLIP mean/std)
        -> ViT-L/16 (24 blocks, width 1024, 16 heads, pre-norm, LayerNorm eps 1e-6, exact GELU) -> all tokens
  prompt -> bert-base-uncased tokenizer + BLIP's added tokens [DEC] (bos) and [ENC], max_length 35, padded, truncated
         -> BLIP's BERT (no token-type embeddings; every layer: self-attention, cross-attention to the image
            tokens, feed-forward) -> hidden state at position 0 ([CLS]: the published inference code does NOT swap
            it for [ENC], unlike BLIP's own image-text matching)
         -> MLP head Linear(768,1024) Drop(.2) Linear(1024,128) Drop(.2) Linear(128,64) Drop(.1) Linear(64,16)
            Linear(16,1) (no activations, as published) -> (r - 0.16717362830052426) / 1.0333394966054072

The module names below mirror the published ones, so ``ImageRewardModel.state_dict()`` keys ARE the published
``ImageReward.pt`` keys (identity mapping, no renaming):
  blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj.{weight,bias}, norm.{weight,bias}}
  blip.visual_encoder.blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}
  blip.text_encoder.embeddings.{word_embeddings.weight, position_embeddings.weight, LayerNorm.{weight,bias}}
  blip.text_encoder.encoder.layer.<i>.{attention,crossattention}.self.{query,key,value}.{weight,bias}
  blip.text_encoder.encoder.layer.<i>.{attention,crossattention}.output.{dense,LayerNorm}.{weight,bias}
  blip.text_encoder.encoder.layer.<i>.{intermediate.dense, output.dense, output.LayerNorm}.{weight,bias}
  mlp.layers.{0,2,4,6,7}.{weight,bias}
The published file also holds keys scoring never uses (``IGNORED_KEYS``: BLIP's contrastive projections and
BERT's position_ids buffer); they are accepted and dropped. Any other missing, unexpected or misshapen key is a
ValueError that lists them.

``arch``: None = the published architecture (ViT-L/16 at 224 px; the BERT part from ``med_config.json`` beside the
weights when it is there, else the published med_config values built in). Otherwise a path to a JSON file
``{"vision": {VisionConfig fields}, "text": {med_config.json keys}}``; ``save_tiny_twin`` writes one for a tiny
random-weight twin that tests use offline.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# The one class every scorer raises, and the weights reader that names the file and its source (a leaf module).
from pipeline.evaluate.scorer_weights import WeightsNotFound, read_torch_file

PUBLISHED_MEAN = 0.16717362830052426  # ImageReward.mean: the head's raw output mean on their data
PUBLISHED_STD = 1.0333394966054072
HUB_REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
MAX_PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTHS = (1024, 128, 64, 16)  # then 1
HEAD_DROPOUTS = (0.2, 0.2, 0.1)  # after the first three Linears (inactive in eval; kept for the key indices)
IGNORED_KEYS = (
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)
CONFIG_KEY = "evaluate.imagereward"
WEIGHTS_SOURCE = (f"{WEIGHTS_FILE} of the Hugging Face hub repo {HUB_REPO} (https://huggingface.co/{HUB_REPO}; "
                  f"huggingface_hub.hf_hub_download('{HUB_REPO}', '{WEIGHTS_FILE}') fetches it)")
_WHERE = (f"ImageReward's published files are {WEIGHTS_FILE} and {MED_CONFIG_FILE} of the hub repo {HUB_REPO} "
          f"(https://huggingface.co/{HUB_REPO}); its tokenizer is {DEFAULT_TOKENIZER} (a folder with vocab.txt)")


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TextConfig:
    """The fields of BLIP's med_config.json that shape the model (dropouts do not matter at inference)."""

    vocab_size: int = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


@dataclass(frozen=True)
class ImageRewardArch:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()


# med_config.json keys that are read elsewhere or do not change inference; anything else is refused.
_MED_CONFIG_INERT = {"architectures", "model_type", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "initializer_range", "type_vocab_size", "encoder_width", "add_cross_attention", "hidden_act",
                     "position_embedding_type"}


def text_config_from_med_config(med: dict[str, Any], *, source: str) -> TextConfig:
    """BLIP's med_config.json -> TextConfig. ``encoder_width`` is ignored: BLIP sets it to the ViT's width."""
    known = {f.name for f in fields(TextConfig)}
    unknown = sorted(set(med) - known - _MED_CONFIG_INERT)
    if unknown:
        raise ValueError(f"imagereward: {source}: unknown med_config keys {unknown}; known: {sorted(known)}")
    if med.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"imagereward: {source}: hidden_act {med['hidden_act']!r}; BLIP's BERT uses 'gelu'")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"imagereward: {source}: only absolute position embeddings are supported")
    if med.get("add_cross_attention", True) is not True:
        raise ValueError(f"imagereward: {source}: add_cross_attention must be true (ImageReward's text encoder "
                         f"attends to the image)")
    return TextConfig(**{k: v for k, v in med.items() if k in known})


def load_arch(arch: str | Path | None, *, med_config: Path | None = None) -> ImageRewardArch:
    """None = the published architecture (text part from ``med_config`` when given); else an arch JSON file."""
    if arch is None:
        if med_config is None:
            return ImageRewardArch()
        return ImageRewardArch(text=text_config_from_med_config(_read_json(med_config), source=str(med_config)))
    path = Path(arch)
    if not path.is_file():
        raise FileNotFoundError(f"imagereward: no arch file at {path} ({CONFIG_KEY}.arch): give a JSON file "
                                f'{{"vision": {{...}}, "text": {{...}}}} or leave it unset for the published model')
    spec = _read_json(path)
    unknown = sorted(set(spec) - {"vision", "text"})
    vision_unknown = sorted(set(spec.get("vision", {})) - {f.name for f in fields(VisionConfig)})
    if unknown or vision_unknown:
        raise ValueError(f"imagereward: {path}: unknown keys {unknown + ['vision.' + k for k in vision_unknown]}")
    return ImageRewardArch(vision=VisionConfig(**spec.get("vision", {})),
                           text=text_config_from_med_config(spec.get("text", {}), source=str(path)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"imagereward: {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"imagereward: {path} must hold a JSON object")
    return value


# ---------------------------------------------------------------- the ViT (BLIP's vit.py layout)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, patches, width]


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), as published
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ViTMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """pixels [B,3,S,S] -> normed tokens [B, 1 + (S/patch)^2, width] (class token first)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size or cfg.width % cfg.heads:
            raise ValueError(f"imagereward: vision config {cfg}: image_size must be a multiple of patch_size and "
                             f"width of heads")
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------- BLIP's BERT (med.py layout)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings; BLIP's BERT has no token-type embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        # mask: bool [B,1,1,keys], True = attend. The published -10000 additive mask gives the same softmax in fp32.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(x.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # post-norm, as BERT


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)  # "self" is the published module name
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, image_width)  # keys/values from the ViT's tokens
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)  # every image token is attended (published: all-ones mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, image_width) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """BLIP's multimodal text encoder: (token ids, padding mask, image tokens) -> last hidden states [B, L, H]."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"imagereward: text config {cfg}: hidden_size must be a multiple of the heads")
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, image_width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask, image_tokens)
        return x


# ---------------------------------------------------------------- the reward model


class RewardHead(nn.Module):
    def __init__(self, in_width: int):
        super().__init__()
        widths = (in_width, *HEAD_WIDTHS)
        parts: list[nn.Module] = []
        for i in range(len(HEAD_WIDTHS)):
            parts.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(HEAD_DROPOUTS):
                parts.append(nn.Dropout(HEAD_DROPOUTS[i]))
        parts.append(nn.Linear(HEAD_WIDTHS[-1], 1))
        self.layers = nn.Sequential(*parts)  # Linear indices 0, 2, 4, 6, 7: the published keys

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class BLIPParts(nn.Module):
    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        self.visual_encoder = VisionTransformer(arch.vision)
        self.text_encoder = BertModel(arch.text, image_width=arch.vision.width)


class ImageRewardModel(nn.Module):
    """pixels + tokens -> raw head output [B] (before the published normalisation)."""

    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        self.arch = arch
        self.blip = BLIPParts(arch)
        self.mlp = RewardHead(arch.text.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        return self.mlp(text[:, 0, :].float()).squeeze(-1)


def model_on_meta(arch: ImageRewardArch) -> ImageRewardModel:
    """The model's parameter names and shapes with no memory: no random init of 446M parameters only to overwrite
    them (the loader assigns the file's tensors), and a preflight check of a file's keys in about a second."""
    with torch.device("meta"):
        return ImageRewardModel(arch)


def fit_state_dict(model: nn.Module, state: dict[str, Any], *, source: str) -> dict[str, torch.Tensor]:
    """The published state dict -> exactly the model's keys; ValueError listing every key that does not fit."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"imagereward: {source} is not a state dict of tensors (the published {WEIGHTS_FILE} is "
                         f"a plain dict 'blip.*'/'mlp.*' -> tensor)")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(IGNORED_KEYS))
    misshapen = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or misshapen:
        problems = [f"{label} ({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", misshapen)) if keys]
        raise ValueError(f"imagereward: the state dict in {source} does not fit the ImageReward architecture "
                         f"({'published' if model.arch == ImageRewardArch() else model.arch}): "
                         + "; ".join(problems)
                         + f". Expected the published layout (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
                           f"; check {CONFIG_KEY}.weights and {CONFIG_KEY}.arch.")
    return {k: state[k] for k in expected}


# ---------------------------------------------------------------- files


def _not_found(what: str, path: str, key: str, detail: str = "") -> WeightsNotFound:
    return WeightsNotFound(f"imagereward: no {what} at {path!r} ({CONFIG_KEY}.{key}){': ' + detail if detail else ''}. "
                           f"{_WHERE}; download them and set {CONFIG_KEY}.weights to the folder or to its "
                           f"{WEIGHTS_FILE}, and {CONFIG_KEY}.backbone to the tokenizer folder.")


def looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def resolve_weights(weights: str | None) -> tuple[Path, Path | None]:
    """-> (ImageReward.pt, med_config.json or None): a local file, a folder holding them, or a hub repo id
    (``THUDM/ImageReward``). Unset is an error, as for every reward model: no silent download."""
    if weights and looks_like_hub_id(weights):
        from huggingface_hub import hf_hub_download

        try:
            pt = Path(hf_hub_download(weights, WEIGHTS_FILE))
            med = Path(hf_hub_download(weights, MED_CONFIG_FILE))
        except Exception as e:  # offline, unknown repo, missing file: all mean "not here"
            raise _not_found("weights", f"hub:{weights}/{WEIGHTS_FILE}", "weights", f"{type(e).__name__}") from e
        return pt, med
    return local_weights(weights)


def local_weights(weights: str | None) -> tuple[Path, Path | None]:
    """-> (ImageReward.pt, med_config.json or None) from a local file or a folder holding them; else WeightsNotFound."""
    if not weights:
        raise _not_found("weights", "<unset>", "weights", "not given")
    path = Path(weights).expanduser()
    if path.is_file():
        med = path.parent / MED_CONFIG_FILE
        return path, med if med.is_file() else None
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise _not_found("weights", str(path / WEIGHTS_FILE), "weights", f"the folder has no {WEIGHTS_FILE}")
        med = path / MED_CONFIG_FILE
        return path / WEIGHTS_FILE, med if med.is_file() else None
    raise _not_found("weights", str(path), "weights")


def tokenizer_folder(backbone: str | None) -> Path | None:
    """The local tokenizer folder ``backbone`` names; None for a hub id (default bert-base-uncased); WeightsNotFound
    for a path meant as local that is not a folder."""
    source = backbone or DEFAULT_TOKENIZER
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise _not_found("tokenizer folder", str(local), "backbone")  # meant as a local folder, not a hub id
    return None


def load_tokenizer(backbone: str | None):
    """bert-base-uncased (or the folder given) plus BLIP's added tokens, as BLIP's init_tokenizer does."""
    from transformers import BertTokenizer

    source = backbone or DEFAULT_TOKENIZER
    local = tokenizer_folder(backbone)
    try:
        tokenizer = BertTokenizer.from_pretrained(str(local) if local else source)
    except Exception as e:
        raise _not_found("tokenizer", source, "backbone", f"{type(e).__name__}: {e}") from e
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


# ---------------------------------------------------------------- the scorer


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class ImageRewardScorer:
    """ImageReward on a list of PIL images and their prompts; ``score`` returns the published normalised reward."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, *, device: str = "cpu", source: str = ""):
        from torchvision import transforms

        if len(tokenizer) > model.arch.text.vocab_size:
            raise ValueError(f"imagereward: the tokenizer has {len(tokenizer)} tokens but the text encoder "
                             f"{model.arch.text.vocab_size}: {CONFIG_KEY}.backbone should be {DEFAULT_TOKENIZER}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        size = model.arch.vision.image_size
        # The published order: resize and crop first, then RGB (matters for palette/alpha images).
        self.preprocess = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            _to_rgb,
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    @classmethod
    def load(cls, *, weights: str | None, backbone: str | None = None, arch: str | None = None,
             device: str = "cpu") -> ImageRewardScorer:
        weights_file, med_config = resolve_weights(weights)
        tokenizer = load_tokenizer(backbone)  # before reading 1.8 GB, so a missing tokenizer fails fast
        model = model_on_meta(load_arch(arch, med_config=med_config if arch is None else None))
        state = read_torch_file(weights_file, scorer="imagereward", source=WEIGHTS_SOURCE)  # names file and source
        fitted = fit_state_dict(model, state, source=str(weights_file))
        # float32 as the published modules, whatever the file's dtype
        model.load_state_dict({k: v.float() for k, v in fitted.items()}, strict=True, assign=True)
        return cls(model, tokenizer, device=device, source=str(weights_file))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images]).to(self.device)

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    @torch.inference_mode()
    def raw_rewards(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """The head's output before normalisation, float32 [N]."""
        if len(images) != len(prompts):
            raise ValueError(f"imagereward: {len(images)} images but {len(prompts)} prompts (one prompt per image)")
        if not images:
            return torch.zeros(0)
        input_ids, attention_mask = self.tokens(prompts)
        return self.model(self.pixels(images), input_ids, attention_mask).float().cpu()

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        raw = self.raw_rewards(images, prompts).double().numpy()
        return (raw - PUBLISHED_MEAN) / PUBLISHED_STD


# ---------------------------------------------------------------- the tiny twin

def _tiny_vocab() -> list[str]:
    import string

    chars = string.ascii_lowercase + string.digits
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation, *("##" + c for c in chars),
              "a", "an", "the", "of", "in", "on", "with", "and", "cat", "dog", "red", "blue", "green", "sketch",
              "painting", "photo", "circle", "square", "style"]
    return list(dict.fromkeys(tokens))


TINY_ARCH = ImageRewardArch(
    vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4),
    text=TextConfig(vocab_size=len(_tiny_vocab()) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64),  # + 2: BLIP's [DEC] and [ENC]
)


def save_tiny_twin(out_dir: str | Path, *, seed: int = 0) -> dict[str, str]:
    """A tiny random-weight ImageReward in the published file layout: ``ImageReward.pt`` (published key names,
    the ignored extras included), ``arch.json`` and ``tokenizer/vocab.txt``. Same seed, same tensors.
    Returns ``{"weights", "backbone", "arch"}`` for ``ImageRewardScorer.load``."""
    out = Path(out_dir)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = _tiny_vocab()
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    arch = TINY_ARCH
    text = {**asdict(arch.text), "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
            "encoder_width": arch.vision.width, "add_cross_attention": True}
    (out / "arch.json").write_text(json.dumps({"vision": asdict(arch.vision), "text": text}, indent=1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageRewardModel(arch)
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed")):
                nn.init.normal_(p, std=0.5)  # zeros by construction; random so every token differs
            elif name.startswith("mlp.") and name.endswith("weight"):
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))  # keeps the linear head's output O(1)
        state = dict(model.state_dict())
        h, w = arch.text.hidden_size, arch.vision.width
        # The keys the published file carries beside the model's (see IGNORED_KEYS).
        state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = torch.randn(8, w), torch.zeros(8)
        state["blip.text_proj.weight"], state["blip.text_proj.bias"] = torch.randn(8, h), torch.zeros(8)
        state["blip.text_encoder.embeddings.position_ids"] = torch.arange(arch.text.max_position_embeddings)[None]
    torch.save(state, out / WEIGHTS_FILE)
    return {"weights": str(out / WEIGHTS_FILE), "backbone": str(out / "tokenizer"), "arch": str(out / "arch.json")}
