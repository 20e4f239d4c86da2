"""Stage 3 — the whole model: token ids + pixels -> next-token logits.

Embed the tokens, run the vision encoder, put its features where the <|image_pad|> / <|video_pad|>
placeholders are (one feature per placeholder, in order), compute the M-RoPE positions, run the decoder,
project to the vocabulary. Matches transformers' Qwen2VLForConditionalGeneration; the module tree is the
hub checkpoint's (`visual.*`, `model.*`, `lm_head`), so hub weights load without renaming.
Dimension legend: B batch, L new tokens, S cached + new tokens, C hidden, V vocab, N patches.
"""
import torch
import torch.nn as nn

from .config import Qwen2VLConfig
from .language import KVCache, TextModel, attention_mask_4d
from .rope import mrope_cos_sin, mrope_position_ids
from .vision import VisionTransformer


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:            # 2B: the output matrix is the input embedding
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, C) embeddings with the visual features scattered into the placeholders."""
        x = self.model.embed_tokens(input_ids)
        for kind, token_id, pixels, grid in (("image", self.config.image_token_id, pixel_values, image_grid_thw),
                                             ("video", self.config.video_token_id, pixel_values_videos, video_grid_thw)):
            if pixels is None:               # (no check while decoding one token: it would sync the GPU)
                if input_ids.shape[1] > 1 and bool((input_ids == token_id).any()):
                    raise ValueError(f"input_ids hold <|{kind}_pad|> tokens but no {kind} pixels were given; "
                                     f"pass pixel_values{'_videos' if kind == 'video' else ''} too")
                continue
            slots = input_ids == token_id                                    # (B, L)
            n_slots = int(slots.sum())
            features = self.visual(pixels, grid)                             # (N/4, C)
            if n_slots != features.shape[0]:
                raise ValueError(f"{kind} placeholders and features do not match: {n_slots} <|{kind}_pad|> "
                                 f"tokens vs {features.shape[0]} {kind} features; build the prompt with the "
                                 "Processor so each placeholder is expanded to grid_thw.prod() / 4 tokens")
            # Row-major over (B, L): the k-th placeholder gets the k-th feature (reference masked_scatter).
            x = x.masked_scatter(slots[..., None], features.to(x.dtype))
        return x

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, *, position_ids=None, rope=None,
                cache: KVCache | None = None, cache_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits (B, L, V), or (B, 1, V) with last_only (prefill never needs the full-sequence logits).

        attention_mask (B, S) covers every token so far (cached and new; 0 = left padding).
        position_ids (3, B, L) are M-RoPE ids; computed here when not given (only valid from position 0).
        rope: their (cos, sin) (B, L, D) instead, already computed (generate's decode steps look them up).
        cache_pos as a 0-dim tensor selects static decoding: attention_mask then spans all cache slots.
        """
        B, L = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None and rope is None:
            if cache_pos:
                raise ValueError("position_ids are required when decoding from a cache (cache_pos > 0)")
            position_ids, _ = mrope_position_ids(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                                                 self.config)
        t = self.config.text
        cos, sin = rope or mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, x.dtype)
        if attention_mask is not None and not isinstance(cache_pos, torch.Tensor) and bool(attention_mask.all()):
            attention_mask = None                                            # no padding: plain causal SDPA
        mask = attention_mask_4d(attention_mask, L, cache_pos)               # (B, 1, L, S) or None
        h = self.model(x, cos, sin, mask, cache, cache_pos)                  # (B, L, C)
        if last_only:
            h = h[:, -1:]                                                    # (B, L, C) -> (B, 1, C)
        return self.lm_head(h)                                               # (B, L, V)
