"""Stage 4 — the language model: a Qwen2 decoder with grouped-query attention and a static KV cache.

Input: token embeddings (B, L, C) with visual features already spliced in, M-RoPE cos/sin (B, L, D).
Output: final hidden states (B, L, C). Matches transformers' Qwen2VLTextModel (REFERENCE 1.3); names
are the checkpoint's (`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm` ...).
Dimension legend: B batch, L new tokens, S cached + new tokens, C hidden, H query heads, K kv heads, D head_dim.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TextConfig
from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in float32 (one fused op), cast back *before* the weight, as the reference.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class KVCache:
    """Preallocated keys / values for every layer: (layers, B, K, max_len, D). Written in place, never grown.

    It holds no position: the caller says where the new tokens go (`cache_pos`), so the write index
    and the M-RoPE position stay two separately named numbers (they differ for visual prompts).
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx               # which slot of the KV cache is ours
        self.H, self.K, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.H * self.D, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.K * self.D, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.K * self.D, bias=True)
        self.o_proj = nn.Linear(self.H * self.D, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, cache_pos):
        """cache_pos: where the L new tokens go; an int (prefill) or a 0-dim tensor (static decode)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.H, self.D)                  # (B, L, H*D) -> (B, L, H, D)
        k = self.k_proj(x).view(B, L, self.K, self.D)                  # (B, L, K*D) -> (B, L, K, D)
        v = self.v_proj(x).view(B, L, self.K, self.D).transpose(1, 2)  # -> (B, K, L, D)
        # q and k rotated in one call: a decode step is made of small kernels, so fewer of them is faster.
        qk = apply_rope(torch.cat([q, k], dim=2), cos[:, :, None], sin[:, :, None])   # (B, L, H+K, D)
        q, k = qk.transpose(1, 2).split([self.H, self.K], dim=1)       # (B, H, L, D), (B, K, L, D)
        if cache is not None and isinstance(cache_pos, torch.Tensor):   # decode: static shapes (CUDA graphs)
            idx = cache_pos + torch.arange(L, device=x.device)          # write at a device-side index ...
            cache.k[self.layer_idx].index_copy_(2, idx, k)
            cache.v[self.layer_idx].index_copy_(2, idx, v)
            k, v = cache.k[self.layer_idx], cache.v[self.layer_idx]     # ... read all max_len keys, mask the rest
        elif cache is not None:                                         # prefill: write the new keys ...
            cache.k[self.layer_idx, :, :, cache_pos:cache_pos + L] = k
            cache.v[self.layer_idx, :, :, cache_pos:cache_pos + L] = v
            if cache_pos:                                               # ... and after a prefix, read it all
                k = cache.k[self.layer_idx, :, :, :cache_pos + L]       # (B, K, S, D)
                v = cache.v[self.layer_idx, :, :, :cache_pos + L]
        # GQA: each group of H/K query heads shares one kv head (enable_gqa instead of repeat_kv copies).
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                           enable_gqa=self.H != self.K)  # (B, H, L, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, cache_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, L: int, cache_pos: int):
    """Padding mask (B, S) of the whole sequence so far -> boolean (B, 1, L, S), True = may attend.

    Causal (query i sees keys <= cache_pos + i) and no padding keys; every token also sees itself, so the
    rows of left-padding tokens are never empty (an all-masked row would give NaN and poison later layers).
    Returns None when there is no padding and plain causal attention does the job (fast SDPA path).
    A tensor cache_pos means static decoding: the mask then spans all attention_mask.shape[1] cache slots.
    """
    if isinstance(cache_pos, torch.Tensor):
        k_pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        q_pos = cache_pos + torch.arange(L, device=attention_mask.device)
        return ((k_pos[None, :] <= q_pos[:, None])[None] & attention_mask[:, None, :].bool())[:, None]
    if attention_mask is None and (L == 1 or cache_pos == 0):
        return None
    S = cache_pos + L
    q_pos = torch.arange(cache_pos, S, device=attention_mask.device if attention_mask is not None else None)
    k_pos = torch.arange(S, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]                             # (L, S) causal
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :S].bool()                # (B, L, S)
    return (mask | (k_pos[None, :] == q_pos[:, None]))[:, None] if mask.ndim == 3 else mask[None, None]


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, cache_pos: int = 0):
        """x (B, L, C) embeddings -> (B, L, C) normalised hidden states."""
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, cache_pos)
        return self.norm(x)
