"""Attention maps: from a recorded query's weights over the prompt to heat maps on each image / video.

`lab.trace.record_attention` gives, for every generated token, its attention over all earlier tokens,
(layers, H, S). This file finds which of those S tokens are each image's or video's merged patches, folds
them back onto their grid, and measures how the weight splits between image, video and text tokens.
Dimension legend: H heads, S tokens attended to, T temporal patches, h / w merged-grid rows / columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("text", "image", "video", "special")   # colours of the token strip


@dataclass(frozen=True)
class Span:
    kind: str            # "image" or "video"
    index: int           # the k-th image (or video) of the prompt, counting from 0
    start: int           # its first <|image_pad|> / <|video_pad|> token in the sequence
    grid: tuple          # merged grid (T, h, w): T*h*w tokens from `start` on

    @property
    def end(self) -> int:
        return self.start + self.grid[0] * self.grid[1] * self.grid[2]


def visual_spans(input_ids, image_grid_thw, video_grid_thw, config) -> list[Span]:
    """The visual placeholder runs of one prompt (L,), in order, with their merged grids."""
    m = config.vision.spatial_merge_size
    grids = {"image": [] if image_grid_thw is None else image_grid_thw.tolist(),
             "video": [] if video_grid_thw is None else video_grid_thw.tolist()}
    ids, spans, seen, i = input_ids.tolist(), [], {"image": 0, "video": 0}, 0
    pad = {config.image_token_id: "image", config.video_token_id: "video"}
    while i < len(ids):
        kind = pad.get(ids[i])
        if kind is None:
            i += 1
            continue
        t, h, w = grids[kind][seen[kind]]
        span = Span(kind, seen[kind], i, (t, h // m, w // m))
        if ids[span.start:span.end] != [ids[i]] * (span.end - span.start):
            raise ValueError(f"{kind} {span.index}: expected {span.end - span.start} placeholder tokens for grid "
                             f"{(t, h, w)} at position {i}; build the prompt with the Processor")
        spans.append(span)
        seen[kind] += 1
        i = span.end
    return spans


def token_kinds(input_ids, config, special_ids=()) -> list[str]:
    """One of KINDS per token of a prompt (L,), for colouring a token strip."""
    special = set(special_ids) | {config.vision_start_token_id, config.vision_end_token_id}
    names = {config.image_token_id: "image", config.video_token_id: "video"}
    return [names.get(t, "special" if t in special else "text") for t in input_ids.tolist()]


def reduce(probs, layer=None, head=None):
    """(layers, H, S) -> (S,): one layer / head, or the mean over them (None)."""
    p = probs.float()
    p = p.mean(0) if layer is None else p[layer]
    return p.mean(0) if head is None else p[head]


def grid_map(weights, span: Span):
    """(S,) attention weights -> (T, h, w): the span's share, laid out on its merged grid (raster order)."""
    return weights[span.start:span.end].reshape(span.grid)


def modality_share(probs, kinds: list[str]) -> dict[str, float]:
    """How a token's attention (mean over layers and heads) splits between KINDS; sums to 1.
    `kinds` labels every token it could see: the prompt's and the answer's so far."""
    w = reduce(probs)                                                     # (S,)
    if len(kinds) < w.shape[0]:
        raise ValueError(f"kinds labels {len(kinds)} tokens but the attention spans {w.shape[0]}; "
                         "label the generated tokens too (as 'text' or 'special')")
    idx = torch.tensor([KINDS.index(k) for k in kinds[:w.shape[0]]])
    share = torch.zeros(len(KINDS)).index_add_(0, idx, w)
    return dict(zip(KINDS, share.tolist()))


def first_token_share(probs) -> float:
    """Attention on the very first token (the attention sink), averaged over layers and heads."""
    return float(reduce(probs)[0])


def stack_shares(record, kinds, row: int = 0) -> torch.Tensor:
    """(N, len(KINDS)) modality shares of every recorded token, for the per-token share plot."""
    return torch.tensor([[modality_share(record.probs(n, row), kinds)[k] for k in KINDS] for n in range(len(record))])
