"""PyTorch building blocks shared by `torch_ndt1` and `torch_ndt2`: the pre-norm encoder layer of
`ibl_jax.models.layers` (same submodule names as the original's, so state dicts load) and ScaleNorm.

Shapes: B trials, L tokens, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaleNorm(nn.Module):
  """`g * x / max(||x||, eps)` with one learned scalar g, as `ibl_jax.models.layers.ScaleNorm`."""

  def __init__(self, num_features: int, eps: float):
    super().__init__()
    self.scale = nn.Parameter(torch.tensor(num_features**0.5))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.scale * x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=self.eps)


def norm(cfg, H: int) -> nn.Module:
  return nn.LayerNorm(H, eps=cfg.norm_eps) if cfg.norm == "layernorm" else ScaleNorm(H, cfg.norm_eps)


class EncoderLayer(nn.Module):
  """Pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x)); GELU exact or tanh, as `cfg.gelu_approximate`."""

  def __init__(self, cfg):
    super().__init__()
    H = cfg.hidden_size
    self.num_heads, self.attention_dropout = cfg.num_heads, cfg.attention_dropout
    self.gelu = "tanh" if cfg.gelu_approximate else "none"
    self.dropout = nn.Dropout(cfg.dropout)
    self.ln1, self.ln2 = norm(cfg, H), norm(cfg, H)
    self.query, self.key, self.value, self.out_proj = (nn.Linear(H, H) for _ in range(4))
    self.up_proj, self.down_proj = nn.Linear(H, cfg.mlp_size), nn.Linear(cfg.mlp_size, H)

  def forward(self, x_BxLxH: torch.Tensor, mask_Bx1xLxL: torch.Tensor) -> torch.Tensor:
    B, L, H = x_BxLxH.shape
    h = self.ln1(x_BxLxH)
    heads = lambda y: y.view(B, L, self.num_heads, H // self.num_heads).transpose(1, 2)  # [B, heads, L, H/heads]
    out = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
                                         attn_mask=mask_Bx1xLxL,
                                         dropout_p=self.attention_dropout if self.training else 0.0)
    x_BxLxH = x_BxLxH + self.out_proj(self.dropout(out.transpose(1, 2).reshape(B, L, H)))
    h = F.gelu(self.up_proj(self.ln2(x_BxLxH)), approximate=self.gelu)
    return x_BxLxH + self.dropout(self.down_proj(h))
