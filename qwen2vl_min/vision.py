"""Stage 2 — the vision encoder: patch rows (N, 1176) -> LLM embeddings (N/4, hidden_size).

A ViT (~675M parameters in the real models) with 2D RoPE instead of absolute position embeddings, so
any resolution works; attention stays inside each temporal patch of each image / video (REFERENCE 2.3);
then the PatchMerger folds every 2x2 window of neighbouring patches into one token (REFERENCE 1.2).
Matches transformers' Qwen2VisionTransformerPretrainedModel; parameter names are its checkpoint names.
Dimension legend: N patches, n blocks, S patches per block, E embed_dim, H heads, D head_dim, C LLM width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig

try:                                    # flash-attention over packed variable-length blocks (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
from .rope import apply_rope, vision_cos_sin, vision_position_ids


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = one (2, 14, 14) tube: a linear map of each 1176-value row."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel covers the whole input, so the convolution is one matmul over the flattened row,
        # whose order (C, T, 14, 14) is exactly the Conv3d weight's.  (N, 1176) @ (1176, E) -> (N, E)
        w = self.proj.weight
        return x.to(w.dtype) @ w.view(w.shape[0], -1).T


def block_attention(q, k, v, grid_thw: torch.Tensor) -> torch.Tensor:
    """Attention within each temporal patch of each image / video, never across them.

    q, k, v: (N, H, D) -> (N, H, D). The t blocks of one image / video all have h*w patches, so they run
    as one batched SDPA call of shape (t, H, h*w, D) — no dense N x N mask is ever built. On CUDA in
    half precision, one varlen flash-attention call covers every block of every image at once.
    """
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        lengths = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])   # patches per block
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device=q.device, dtype=torch.int32)
        longest = int(lengths.max())
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        # (n, H, D) -> (t, S, H, D) -> (t, H, S, D)
        blocks = [x[start:start + n].view(t, h * w, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*blocks)                       # (t, H, S, D)
        out.append(o.transpose(1, 2).reshape(n, *q.shape[1:]))           # -> (n, H, D)
        start += n
    return torch.cat(out)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x, cos, sin, grid_thw):
        N, E = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)   # (N, 3E) -> 3 x (N, H, D)
        # RoPE in float32, as the reference does (bf16 angles would drift at large h, w).
        cos, sin = cos[:, None], sin[:, None]                            # (N, D) -> (N, 1, D)
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        o = block_attention(q, k, v, grid_thw)                           # (N, H, D)
        return self.proj(o.reshape(N, E))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))                   # QuickGELU, as in CLIP / DFN


class VisionBlock(nn.Module):
    """Pre-norm transformer block; LayerNorm with bias (Qwen2.5-VL later switched to RMSNorm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, grid_thw):
        x = x + self.attn(self.norm1(x), cos, sin, grid_thw)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 neighbouring patches -> one LLM token: LayerNorm each patch, concatenate four, 2-layer MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.hidden_size))

    def forward(self, x):
        # Other end of the merge invariant (processor._patchify): rows 4k..4k+3 are one 2x2 window,
        # so a plain view concatenates the four neighbours.  (N, E) -> (N/4, 4E) -> (N/4, C)
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 1176), grid_thw (n, 3) -> merged features (N/4, C)."""
        if pixel_values.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but grid_thw "
                             f"{grid_thw.tolist()} describes {int(grid_thw.prod(-1).sum())}; pass them together")
        x = self.patch_embed(pixel_values)                               # (N, E)
        pos = vision_position_ids(grid_thw, self.cfg.spatial_merge_size).to(x.device)   # (N, 2)
        cos, sin = vision_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)          # (N, D) each
        for block in self.blocks:
            x = block(x, cos, sin, grid_thw)
        return self.merger(x)                                            # (N/4, C)
