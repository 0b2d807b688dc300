"""The published architectures of SDXL base 1.0 and SD 1.5, shipped so they can be built without the hub.

Each config is the model's config.json as a dict, reduced to the keys whose values differ from the class's defaults
(diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextConfig); the keys left out are the classes'
defaults and the published values alike (act_fn "silu", norm_eps 1e-5, layers_per_block 2, in/out channels 4, ...).
Sources: the config.json files of stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-v1-5/
stable-diffusion-v1-5 (formerly runwayml/stable-diffusion-v1-5), unchanged across their revisions.

PUBLISHED_PARAMETERS are the parameter counts of the published weights (diffusers' `num_parameters` docstring
gives 859,520,964 for the SD 1.5 UNet; the others are what the loaded models report, as training logs and model
tables in public code record them). A config that builds to another count is not the published one:
tests/models/test_check.py builds every one and compares.

    build_on_meta("sdxl", "unet")            # the published SDXL UNet, no weights, in about a second
    build_on_meta(config_dict, "vae")        # any AutoencoderKL config.json
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Kind = Literal["sdxl", "sd15"]

# The class each component folder holds, as the loader (pipeline/models/loader.py) loads it.
COMPONENT_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
}
DIFFUSERS_COMPONENTS = ("unet", "vae")  # the rest are transformers models

_VAE = {  # both models' VAE: the same architecture (SDXL's was retrained, its latents scale differently)
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
}

# OpenAI CLIP ViT-L/14's text tower: SDXL's first encoder and SD 1.5's only one. bos/eos are the ids the 2022
# config.json carries (not the tokenizer's 49406/49407); transformers keeps that legacy pooling (argmax of ids).
_CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

ARCHITECTURES: dict[Kind, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": {
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,  # bigG pooled 1280 + 6 micro-conditions x 256
        },
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": dict(_CLIP_L_TEXT),
        # OpenCLIP ViT-bigG/14's text tower with its projection (the pooled vector SDXL conditions on).
        "text_encoder_2": {
            **_CLIP_L_TEXT,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
    },
    "sd15": {
        "unet": {
            "sample_size": 64,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8,  # 8 heads in every block (the name is historical)
            "cross_attention_dim": 768,
        },
        "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder": dict(_CLIP_L_TEXT),
    },
}

PUBLISHED_PARAMETERS: dict[Kind, dict[str, int]] = {
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
}

# The UNets alone, for bench/cost_model.py.
UNET_CONFIGS: dict[Kind, dict[str, Any]] = {kind: parts["unet"] for kind, parts in ARCHITECTURES.items()}

# Hub ids whose architecture is one of the above, and the weight variants their repos publish for every component.
HUB_IDS: dict[str, Kind] = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",  # the repo's former name, redirected by the hub
}
PUBLISHED_VARIANTS: dict[str, tuple[str | None, ...]] = {repo: (None, "fp16") for repo in HUB_IDS}


def build_on_meta(kind_or_config: Kind | dict[str, Any], component: str, *, dtype: torch.dtype | None = None):
    """The `component` ("unet", "vae", "text_encoder", "text_encoder_2") on the meta device: every parameter has its
    shape and dtype but no storage, so even the SDXL UNet builds in about a second and takes no memory.

    `kind_or_config` is "sdxl" / "sd15" (the published architecture) or a config.json dict (private keys such as
    "_class_name" are ignored). `dtype`: the parameters' dtype (default: torch's default, float32)."""
    if component not in COMPONENT_CLASSES:
        raise ValueError(f"Unknown component {component!r}; choose from {sorted(COMPONENT_CLASSES)}.")
    config = ARCHITECTURES[kind_or_config][component] if isinstance(kind_or_config, str) else kind_or_config
    default = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # built in the dtype directly: nothing to cast afterwards
    try:
        with torch.device("meta"):
            return _construct(config, component)
    finally:
        torch.set_default_dtype(default)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _construct(config: dict[str, Any], component: str):
    if component in DIFFUSERS_COMPONENTS:
        import diffusers

        model_class = getattr(diffusers, COMPONENT_CLASSES[component])
        return model_class.from_config(config)
    import transformers

    public = {key: value for key, value in config.items() if not key.startswith("_")}
    model_class = getattr(transformers, COMPONENT_CLASSES[component])
    return model_class(transformers.CLIPTextConfig.from_dict(public))
