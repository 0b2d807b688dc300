"""Prompt encoding exactly as diffusers' SDXL and SD1.5 pipelines do it, for captions in a batch.

The feature store keeps these embeddings so training never runs a text encoder; they must equal what
`pipe.encode_prompt(...)` feeds the UNet at generation time, or the model is trained on other conditioning than
it is sampled with.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(
    text_encoders: list,
    tokenizers: list,
    captions: list[str],
    *,
    kind: str,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds [B, 77, D], pooled_prompt_embeds [B, P] or None) for `captions`.

    SDXL: the penultimate hidden states of both encoders, concatenated on the feature axis (D = 768 + 1280 for
    the real model); pooled = encoder 2's projected end-of-text embedding. SD1.5: the last hidden state of its one
    encoder (after the final layer norm); no pooled embedding.
    """
    expected = {"sdxl": 2, "sd15": 1}.get(kind)
    if expected is None:
        raise ValueError(f"Unknown model kind {kind!r}; choose 'sdxl' or 'sd15'.")
    if len(text_encoders) != expected or len(tokenizers) != expected:
        raise ValueError(
            f"A {kind} model has {expected} text encoder(s) and tokenizer(s); got {len(text_encoders)} and "
            f"{len(tokenizers)}. Load them with load_components(..., parts=('text',))."
        )
    tokens = [_tokenize(tokenizer, captions).to(device) for tokenizer in tokenizers]
    if kind == "sd15":
        encoder = text_encoders[0]
        # Only a few SD1.5 derivatives set use_attention_mask; the original model attends to the padding.
        attention_mask = tokens[0].attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        hidden = encoder(tokens[0].input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.to(encoder.dtype), None
    hidden_states = []
    for encoder, encoded in zip(text_encoders, tokens):
        output = encoder(encoded.input_ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
    pooled = output.text_embeds  # the second encoder's, projected: SDXL's pooled text embedding
    prompt_embeds = torch.cat(hidden_states, dim=-1).to(text_encoders[-1].dtype)
    return prompt_embeds, pooled


def sdxl_add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> list[int]:
    """SDXL's six micro-conditioning ints in diffusers' order: original (h, w), crop (top, left), target (h, w)."""
    return [int(v) for v in (*original_size, *crop_top_left, *target_size)]


def _tokenize(tokenizer, captions: list[str]):
    """Padded to the encoder's 77 positions and truncated there, as the pipelines tokenize."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
