"""Rotary position embeddings, as plain functions (rotate-half convention).

Vision: 2D RoPE — each patch gets (h, w) ids, listed in the same 2x2-window-major order as the patch
rows; head_dim/4 frequencies rotate by h and head_dim/4 by w (REFERENCE 2.1). Language: M-RoPE — every
token has three ids (t, h, w); text has t = h = w, an image's tokens share one t and spread over h and w;
`mrope_section` gives the t / h / w rows bands of the rotary frequencies (REFERENCE 5.1, paper 2.1).
Dimension legend: B batch, L tokens, N patches, H heads, D head_dim.
"""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: pairs dim d with d + D/2 (no weight permutation needed)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by the angles whose cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """The dim/2 rotary frequencies theta^(-2i/dim), in float32 like the reference."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


# ---------------------------------------------------------------- vision: 2D RoPE
def vision_position_ids(grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """grid_thw (n, 3) -> (N, 2) (h, w) patch ids in merge-window order, repeated for every temporal patch."""
    ids = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).view(h, 1).expand(h, w)
        wpos = torch.arange(w).view(1, w).expand(h, w)
        hw = torch.stack([hpos, wpos], dim=-1)                        # (h, w, 2)
        # (h, w, 2) -> (h/m, m, w/m, m, 2) -> (h/m, w/m, m, m, 2): the patch rows' order (processor._patchify)
        hw = hw.reshape(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4)
        ids.append(hw.reshape(-1, 2).repeat(t, 1))                    # (t*h*w, 2)
    return torch.cat(ids)


def vision_cos_sin(pos_ids: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """(N, 2) ids -> cos, sin (N, D): dims [0, D/4) turn with h, [D/4, D/2) with w, then the same again."""
    freqs = pos_ids[..., None].float() * inv_freq(head_dim // 2, theta, pos_ids.device)  # (N, 2, D/4)
    angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)                              # (N, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                        # (N, D)
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------- language: M-RoPE
def _vision_block_ids(t: int, h: int, w: int, start: int) -> torch.Tensor:
    """LLM grid (t, h, w) after merging -> (3, t*h*w) ids in raster order, t outermost, all offset by start."""
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_position_ids(input_ids, image_grid_thw, video_grid_thw, attention_mask, config):
    """(B, L) ids -> position_ids (3, B, L), rope_deltas (B, 1).

    The paper's rule (= transformers 4.x and vLLM): text positions count up by one on all three rows;
    a visual block starts at the next free position, t/h/w counted from there; the text after it
    resumes at max(all three rows) + 1. Padding (attention_mask == 0) gets position 1 and is ignored.
    rope_deltas = max position + 1 - L, so the token at cache index i decodes at position i + delta.
    """
    B, L = input_ids.shape
    merge = config.vision.spatial_merge_size
    grids = {config.image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
             config.video_token_id: iter([] if video_grid_thw is None else video_grid_thw.tolist())}
    position_ids = torch.ones(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    mask = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        ids = input_ids[b].cpu()[mask[b]].tolist()
        pieces, i, nxt = [], 0, 0                          # nxt: next free position
        while i < len(ids):
            if ids[i] in grids:                            # a run of <|image_pad|> / <|video_pad|>
                try:
                    t, h, w = next(grids[ids[i]])
                except StopIteration:
                    raise ValueError(f"sequence {b} has more visual blocks than grid_thw rows; "
                                     "pass one grid per image / video") from None
                n = t * (h // merge) * (w // merge)
                block = _vision_block_ids(t, h // merge, w // merge, nxt)
                pieces.append(block)
                i += n
                nxt = int(block.max()) + 1
            else:                                          # a run of text tokens
                j = i
                while j < len(ids) and ids[j] not in grids:
                    j += 1
                pieces.append(torch.arange(nxt, nxt + j - i).expand(3, -1))
                nxt += j - i
                i = j
        pos = torch.cat(pieces, dim=1)[:, :len(ids)] if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, mask[b]] = pos
        deltas[b] = nxt - L
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section, dtype=torch.float32):
    """(3, B, L) ids -> cos, sin (B, L, D). Frequency band i of mrope_section takes its angles from row i."""
    freqs = position_ids[..., None].float() * inv_freq(head_dim, theta, position_ids.device)  # (3, B, L, D/2)
    bands = freqs.split(list(mrope_section), dim=-1)                 # t: highest freqs, then h, then w
    angles = torch.cat([band[i] for i, band in enumerate(bands)], dim=-1)                     # (B, L, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                              # (B, L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)
