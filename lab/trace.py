"""Forward hooks that record what the model computed, for teaching ("show your work").

Nothing here runs the model a second way: hooks watch the ordinary forward pass of `qwen2vl_min`, and the
attention a generated token paid is recomputed exactly from the query the hook captured and the keys that
the same generation left in its KV cache (the cache object is the one `generate` allocated).
Dimension legend: B batch, H query heads, K kv heads, D head_dim, S cached tokens, N recorded tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qwen2vl_min.rope import apply_rope


@dataclass
class AttentionRecord:
    """Per decoder layer, the rotated query of every position that chose a token, and where it sat."""
    queries: list[list[torch.Tensor]] = field(default_factory=list)   # [layer][n] -> (B, H, D)
    positions: list[int] = field(default_factory=list)                # cache index of each recorded query
    visible: list = field(default_factory=list)       # (B, position+1) bool keys it could see; None = all
    keys: torch.Tensor | None = None        # the generation's KV-cache keys (layers, B, K, max_len, D)

    def __len__(self):
        return len(self.positions)

    def probs(self, n: int, row: int = 0) -> torch.Tensor:
        """Attention of the n-th recorded query over every earlier token: (layers, H, S=position+1).

        softmax(q k^T / sqrt(D)) over the cached keys, exactly what the model's SDPA call computed."""
        pos, out = self.positions[n], []
        for layer, qs in enumerate(self.queries):
            q = qs[n][row].float()                                    # (H, D)
            k = self.keys[layer, row, :, :pos + 1].float()            # (K, S, D)
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # GQA: (K, S, D) -> (H, S, D)
            scores = torch.einsum("hd,hsd->hs", q, k) / math.sqrt(q.shape[-1])   # (H, S)
            if self.visible[n] is not None:                           # left padding of a batch
                scores = scores.masked_fill(~self.visible[n][row].to(scores.device), float("-inf"))
            out.append(scores.softmax(-1))
        return torch.stack(out)                                       # (layers, H, S)

    def compact(self) -> "AttentionRecord":
        """Keep only the cache slots the recorded queries can see (a copy: the cache's slack is freed)."""
        if self.keys is not None and self.positions:
            self.keys = self.keys[:, :, :, :max(self.positions) + 1].clone()
        return self


class record_attention:
    """Context manager: while open, every forward of `model` that writes into a KV cache records the query of
    its last position (the one that picks the next token) in every layer. Use around `q.generate(...)`:

        with record_attention(model, max_tokens=256) as rec:
            tokens = list(q.generate(model, batch, 32))
        rec.probs(i)   # (layers, H, S): what the query that chose tokens[i] attended to

    Memory stays bounded: at most `max_tokens` queries (layers x H x D numbers each) are kept.
    """

    def __init__(self, model, max_tokens: int = 512):
        self.model, self.max_tokens = model, max_tokens
        self.record, self._handles, self._q = AttentionRecord(), [], {}

    def __enter__(self) -> AttentionRecord:
        layers = self.model.model.layers
        self.record.queries = [[] for _ in layers]
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._keep_q(i)))
            self._handles.append(attn.register_forward_hook(self._on_attention(i, attn)))
        return self.record

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _keep_q(self, i):
        def hook(module, args, out):            # (B, L, H*D), before RoPE
            self._q[i] = out
        return hook

    def _on_attention(self, i, attn):
        def hook(module, args, out):
            x, cos, sin, mask, cache, cache_pos = args
            if cache is None:                   # a plain forward (training, a full-sequence check): not ours
                return
            B, L, _ = x.shape
            if i == 0:                          # layer 0 opens the record of this forward pass
                if len(self.record) >= self.max_tokens:
                    return
                pos = int(cache_pos) + L - 1
                self.record.positions.append(pos)
                self.record.visible.append(None if mask is None else mask[:, 0, -1, :pos + 1].clone())
                self.record.keys = cache.k      # a reference: the values and the cache object are not kept
            if len(self.record.queries[i]) >= len(self.record.positions):
                return                          # the record is full
            q = self._q.pop(i)[:, -1:].view(B, 1, attn.H, attn.D).transpose(1, 2)   # (B, H, 1, D)
            q = apply_rope(q, cos[:, None, -1:], sin[:, None, -1:])[:, :, 0]        # (B, H, D) rotated
            self.record.queries[i].append(q.detach().to(torch.float16 if q.is_cuda else torch.float32))
        return hook
