"""A PyTorch NDT1 equal to ours, for side-by-side benchmarks against PyTorch on the same machine.

Built from the state dict our export writes (`convert.params_to_torch_state_dict`: the original's key names,
stitchers keyed by neuron count), so its weights are ours; `forward` returns the same log-rates as
`ibl_jax.models.ndt1.NDT1` (tests/test_torch_ndt1.py). Like ours, and unlike the original (one session per
batch), a batch may mix sessions: the per-session stitchers are stacked `[S, N_max, C]` / `[S, H, N_max]` and
gathered per trial. Dropout at our places and rates (embedding, attention probabilities, the concatenated heads,
the MLP output), active in `train()` mode, so a train step does the same work as ours. Learned positions and
LayerNorm only (the paper's model); needs `torch` (`pip install -r requirements-convert.txt`).

Shapes: B trials, T bins, N = N_max neurons, C stitch channels, E = embed_mult·C, H hidden, L = P + T tokens
with P prefix tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibl_jax import torch_layers
from ibl_jax.errors import UserError


def attention_mask(time_mask_BxT: torch.Tensor, num_prefix: int, causal: bool, causal_prefix: str) -> torch.Tensor:
  """Boolean [B, L, L] (True: query i may attend key j), as `ibl_jax.models.ndt1.attention_mask`."""
  B, T = time_mask_BxT.shape
  L = num_prefix + T
  key_real_BxL = torch.cat([torch.ones(B, num_prefix, dtype=torch.bool), time_mask_BxT.bool()], dim=1)
  i_Lx1, j_1xL = torch.arange(L)[:, None], torch.arange(L)[None, :]
  context_LxL = torch.ones(L, L, dtype=torch.bool)
  if causal:
    context_LxL = (j_1xL < num_prefix) | (j_1xL <= i_Lx1)
    if causal_prefix == "original":
      context_LxL = context_LxL | (i_Lx1 < num_prefix)
  return (i_Lx1 == j_1xL)[None] | (context_LxL[None] & key_real_BxL[:, None, :])


class TorchNDT1(nn.Module):
  """NDT1 with stacked per-session stitchers; `forward` mirrors `NDT1.__call__` (deterministic in `eval()` mode)."""

  def __init__(self, cfg, *, num_sessions: int, n_max: int):
    super().__init__()
    if cfg.position != "learned" or cfg.norm != "layernorm" or not cfg.stitching or cfg.gelu_approximate:
      raise UserError("the PyTorch NDT1 covers the paper's model: learned positions, LayerNorm, stitching, "
                      "exact GELU")
    C, H, E = cfg.n_channels, cfg.hidden_size, cfg.embed_mult * cfg.n_channels
    self.causal_prefix, self.embed_act, self.embed_scale = cfg.causal_prefix, cfg.embed_act, float(cfg.embed_scale)
    self.stitch_in_weight = nn.Parameter(torch.zeros(num_sessions, n_max, C))
    self.stitch_in_bias = nn.Parameter(torch.zeros(num_sessions, C))
    self.embed_spikes, self.projection = nn.Linear(C, E), nn.Linear(E, H)
    self.embed_pos = nn.Embedding(cfg.max_bins, H)
    self.embed_dropout = nn.Dropout(cfg.embed_dropout)
    self.embed_session = nn.Embedding(num_sessions, H) if cfg.use_session else None
    self.embed_prompt = nn.Embedding(cfg.num_prompts, H) if cfg.use_prompt else None
    self.num_prefix = int(cfg.use_session) + int(cfg.use_prompt)
    self.layers = nn.ModuleList(torch_layers.EncoderLayer(cfg) for _ in range(cfg.num_layers))
    self.out_norm = nn.LayerNorm(H, eps=cfg.norm_eps)
    self.stitch_out_weight = nn.Parameter(torch.zeros(num_sessions, H, n_max))
    self.stitch_out_bias = nn.Parameter(torch.zeros(num_sessions, n_max))

  def forward(self, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx: int, causal: bool) -> torch.Tensor:
    B, T, _ = spikes_BxTxN.shape
    # The per-trial gather of stitch kernels, as ours does (the original runs one session per batch).
    x_BxTxC = torch.einsum("btn,bnc->btc", spikes_BxTxN, self.stitch_in_weight[session_idx_B])
    x_BxTxC = x_BxTxC + self.stitch_in_bias[session_idx_B][:, None]
    x_BxTxE = self.embed_spikes(x_BxTxC)
    x_BxTxE = (F.softsign(x_BxTxE) if self.embed_act == "softsign" else x_BxTxE) * self.embed_scale
    x_BxTxH = self.embed_dropout(self.projection(x_BxTxE) + self.embed_pos.weight[:T][None])
    prefix = []
    if self.embed_session is not None:
      prefix.append(self.embed_session(session_idx_B)[:, None])
    if self.embed_prompt is not None:
      prefix.append(self.embed_prompt(torch.full((B,), int(prompt_idx), dtype=torch.long))[:, None])
    x_BxLxH = torch.cat([*prefix, x_BxTxH], dim=1)
    mask_Bx1xLxL = attention_mask(time_mask_BxT, self.num_prefix, causal, self.causal_prefix)[:, None]
    for layer in self.layers:
      x_BxLxH = layer(x_BxLxH, mask_Bx1xLxL)
    x_BxTxH = self.out_norm(x_BxLxH)[:, self.num_prefix:]
    out = torch.einsum("bth,bhn->btn", x_BxTxH, self.stitch_out_weight[session_idx_B])
    return out + self.stitch_out_bias[session_idx_B][:, None]


def mask_neurons(spikes_BxTxN: torch.Tensor, ratio: float, zero_ratio: float, random_ratio: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
  """Neuron masking as the original's `Masker` does it inside its forward in training (mode "neuron"): a
  Bernoulli(ratio) draw per neuron, shared by the batch; of the masked entries a Bernoulli(zero_ratio) share is
  zeroed and a Bernoulli(random_ratio) share of the rest replaced by uniform counts up to the batch's maximum,
  each draw over the whole [B, T, N]. Returns (inputs, targets mask)."""
  mask_N = torch.bernoulli(torch.full(spikes_BxTxN.shape[2:], ratio))
  mask_BxTxN = mask_N.expand_as(spikes_BxTxN).bool()
  zero_BxTxN = torch.bernoulli(torch.full(spikes_BxTxN.shape, zero_ratio)).bool() & mask_BxTxN
  inputs = spikes_BxTxN.masked_fill(zero_BxTxN, 0.0)
  random_BxTxN = torch.bernoulli(torch.full(spikes_BxTxN.shape, random_ratio)).bool() & mask_BxTxN & ~zero_BxTxN
  counts = (spikes_BxTxN.max() * torch.rand(spikes_BxTxN.shape)).to(spikes_BxTxN.dtype)
  return torch.where(random_BxTxN, counts, inputs), mask_BxTxN


def from_state_dict(state_dict: dict[str, np.ndarray], cfg, num_neurons: Sequence[int], n_max: int) -> TorchNDT1:
  """A `TorchNDT1` holding an exported state dict; session i is the stitcher of N = num_neurons[i], padded."""
  model = TorchNDT1(cfg, num_sessions=len(num_neurons), n_max=n_max)
  t = lambda name: torch.from_numpy(np.asarray(state_dict[name], np.float32))
  own = {}
  w_in, b_in = torch.zeros(len(num_neurons), n_max, cfg.n_channels), torch.zeros(len(num_neurons), cfg.n_channels)
  w_out, b_out = torch.zeros(len(num_neurons), cfg.hidden_size, n_max), torch.zeros(len(num_neurons), n_max)
  for i, n in enumerate(num_neurons):
    w_in[i, :n] = t(f"encoder.stitcher.stitcher_dict.{n}.weight").T
    b_in[i] = t(f"encoder.stitcher.stitcher_dict.{n}.bias")
    w_out[i, :, :n] = t(f"stitch_decoder.stitch_decoder_dict.{n}.weight").T
    b_out[i, :n] = t(f"stitch_decoder.stitch_decoder_dict.{n}.bias")
  own.update(stitch_in_weight=w_in, stitch_in_bias=b_in, stitch_out_weight=w_out, stitch_out_bias=b_out)
  prefix = "encoder.embedder."
  for ours in ("embed_spikes", "projection"):
    own[f"{ours}.weight"], own[f"{ours}.bias"] = t(f"{prefix}{ours}.weight"), t(f"{prefix}{ours}.bias")
  own["embed_pos.weight"] = t(f"{prefix}embed_pos.weight")
  for name in ("embed_session", "embed_prompt"):
    if getattr(model, name) is not None:
      own[f"{name}.weight"] = t(f"{prefix}{name}.weight")
  for key in state_dict:
    if key.startswith("encoder.layers."):  # encoder.layers.{l}.{ln1|attn.q...|mlp.up_proj}.{weight|bias}
      own[key[len("encoder."):].replace("attn.", "").replace("mlp.", "")] = t(key)
  own["out_norm.weight"], own["out_norm.bias"] = t("encoder.out_norm.weight"), t("encoder.out_norm.bias")
  model.load_state_dict(own, strict=True)
  return model.eval()
