"""A PyTorch NDT2 equal to ours, for side-by-side benchmarks against PyTorch on the same machine.

Built from the state dict our export writes (`convert.params_to_torch_state_dict`: the original STPatch's key
names, [out, in] weights), so its weights are ours; `forward` returns the same log-rates as
`ibl_jax.models.ndt2.NDT2` in its default scheme (`compat="none"`, tests/test_torch_ndt2.py): a batch may mix
sessions, each trial's neuron count comes from its session, padded neurons and bins are zeroed, and a patch
without any real neuron (bin) is masked as a key per trial. Space-time patches of F neurons × Ft bins, learned
space and time positions (each through its own norm), session and prompt prefix tokens, the causal scheme by
time patch, and optionally each space patch's majority-region embedding (not in the export: taken from our
params). Dropout at our places and rates (embedding, attention probabilities, the concatenated heads, the MLP
output), active in `train()` mode. LayerNorm or ScaleNorm, exact or tanh GELU; `compat="original"` and RoPE are
not covered. Needs `torch` (`pip install -r requirements-convert.txt`).

Shapes: B trials, T bins, N = N_max neurons, F neurons and Ft bins per patch, S = ceil(N / F) space patches,
Tp = ceil(T / Ft) time patches, K = Tp·S patch tokens (time-major: k = t·S + s), C = Ft·F values per patch,
E = embed_mult·C, H hidden, L = P + K tokens with P prefix tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ibl_jax import torch_layers
from ibl_jax.errors import UserError


def attention_mask(key_real_BxK: torch.Tensor, num_prefix: int, num_space: int, causal: bool) -> torch.Tensor:
  """Boolean [B, L, L] (True: query i may attend key j), as `NDT2.attention_mask` (compat "none") in time-major
  token order: I OR (context AND key is real AND query is real: a padded token sees only itself); the causal
  context lets a token see the prefix and the tokens of time patches <= its own, and the prefix only the prefix."""
  B, K = key_real_BxK.shape
  L = num_prefix + K
  device = key_real_BxK.device
  key_real_BxL = torch.cat([torch.ones(B, num_prefix, dtype=torch.bool, device=device), key_real_BxK.bool()], dim=1)
  i_Lx1, j_1xL = torch.arange(L, device=device)[:, None], torch.arange(L, device=device)[None, :]
  context_LxL = torch.ones(L, L, dtype=torch.bool, device=device)
  if causal:
    time_L = torch.cat([torch.full((num_prefix,), -1, device=device),
                        torch.arange(K, device=device) // num_space])  # the prefix precedes every bin
    context_LxL = time_L[None, :] <= time_L[:, None]
  return (i_Lx1 == j_1xL)[None] | (context_LxL[None] & key_real_BxL[:, None, :] & key_real_BxL[:, :, None])


class TorchNDT2(nn.Module):
  """NDT2 (space-time patches); `forward` mirrors `NDT2.__call__` with compat "none" (deterministic in `eval()`)."""

  def __init__(self, cfg, *, num_sessions: int, n_max: int, session_neurons: Sequence[int] | None = None,
               session_regions: Sequence[Sequence[int]] | None = None):
    super().__init__()
    from ibl_jax.models import ndt2  # pylint: disable=g-import-not-at-top
    if cfg.compat != "none":
      raise UserError(f"the PyTorch NDT2 covers model.compat='none' only, not {cfg.compat!r}")
    if cfg.position != "learned":
      raise UserError(f"the PyTorch NDT2 covers learned positions only, not model.position={cfg.position!r}")
    if cfg.norm not in ("layernorm", "scalenorm"):
      raise UserError(f"model.norm must be 'layernorm' or 'scalenorm', got {cfg.norm!r}")
    if cfg.embed_act not in ("softsign", "identity"):
      raise UserError(f"model.embed_act must be softsign or identity, got {cfg.embed_act!r}")
    if n_max > cfg.max_neurons:
      raise UserError(f"sessions have up to {n_max} neurons, more than model.max_neurons={cfg.max_neurons}")
    Fn, Ft, H = cfg.patch_neurons, cfg.patch_bins, cfg.hidden_size
    C = Fn * Ft
    E = cfg.embed_mult * C
    self.n_max, self.max_bins, self.patch_neurons, self.patch_bins = n_max, cfg.max_bins, Fn, Ft
    self.num_space = math.ceil(n_max / Fn)
    self.embed_act, self.embed_scale = cfg.embed_act, float(cfg.embed_scale)
    neurons = [int(n) for n in (session_neurons if session_neurons is not None else [n_max] * num_sessions)]
    if len(neurons) != num_sessions or max(neurons, default=0) > n_max:
      raise UserError(f"session_neurons {neurons} do not fit {num_sessions} sessions of at most {n_max} neurons")
    self.register_buffer("session_neurons_S", torch.tensor(neurons, dtype=torch.long), persistent=False)
    self.embed_spikes, self.projection = nn.Linear(C, E), nn.Linear(E, H)
    self.embed_space_pos = nn.Embedding(math.ceil(cfg.max_neurons / Fn), H)
    self.space_pos_norm = torch_layers.norm(cfg, H)
    self.embed_time_pos = nn.Embedding(math.ceil(cfg.max_bins / Ft), H)
    self.time_pos_norm = torch_layers.norm(cfg, H)
    self.embed_dropout = nn.Dropout(cfg.embed_dropout)
    self.embed_session = nn.Embedding(num_sessions, H) if cfg.use_session else None
    self.embed_prompt = nn.Embedding(cfg.num_prompts, H) if cfg.use_prompt else None
    self.num_prefix = int(cfg.use_session) + int(cfg.use_prompt)
    self.layers = nn.ModuleList(torch_layers.EncoderLayer(cfg) for _ in range(cfg.num_layers))
    self.out_norm = torch_layers.norm(cfg, H)
    self.decoder = nn.Linear(H, C)
    self.embed_region = self.region_norm = None
    if cfg.get("embed_region", False):
      if session_regions is None:
        raise UserError("model.embed_region=True needs each session's neuron regions (session_regions)")
      table = ndt2.patch_regions(session_regions, self.num_space, Fn)  # [S][num_space], as ours
      self.register_buffer("patch_regions_SxP", torch.tensor(table, dtype=torch.long), persistent=False)
      self.embed_region, self.region_norm = nn.Embedding(cfg.num_regions, H), torch_layers.norm(cfg, H)

  def patch(self, spikes_BxTxN, time_mask_BxT, neuron_mask_BxN) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, K, C] (time-major) and whether each token is a real key [B, K], as `NDT2.patch`."""
    B, T, N = spikes_BxTxN.shape
    Fn, Ft, S = self.patch_neurons, self.patch_bins, self.num_space
    Tp = -(-T // Ft)
    real_BxTxN = time_mask_BxT[:, :, None] & neuron_mask_BxN[:, None, :]
    x_BxTxN = torch.where(real_BxTxN, spikes_BxTxN.float(), 0.0)
    x_BxTxN = F.pad(x_BxTxN, (0, S * Fn - N, 0, Tp * Ft - T))
    time_real_BxTp = F.pad(time_mask_BxT, (0, Tp * Ft - T)).view(B, Tp, Ft).any(-1)
    space_real_BxS = F.pad(neuron_mask_BxN, (0, S * Fn - N)).view(B, S, Fn).any(-1)
    key_real_BxK = (time_real_BxTp[:, :, None] & space_real_BxS[:, None, :]).reshape(B, Tp * S)
    patches_BxKxC = x_BxTxN.view(B, Tp, Ft, S, Fn).transpose(2, 3).reshape(B, Tp * S, Ft * Fn)
    return patches_BxKxC, key_real_BxK

  def forward(self, spikes_BxTxN, time_mask_BxT, session_idx_B, prompt_idx: int, causal: bool) -> torch.Tensor:
    B, T, N = spikes_BxTxN.shape
    if N != self.n_max:
      raise UserError(f"spikes have {N} neurons, the model was built for n_max={self.n_max}")
    if T > self.max_bins:
      raise UserError(f"{T} time bins exceed model.max_bins={self.max_bins}")
    Fn, Ft, S = self.patch_neurons, self.patch_bins, self.num_space
    Tp = -(-T // Ft)
    session_idx_B = session_idx_B.long()
    n_B = self.session_neurons_S[session_idx_B]
    neuron_mask_BxN = torch.arange(N, device=n_B.device)[None, :] < n_B[:, None]
    patches_BxKxC, key_real_BxK = self.patch(spikes_BxTxN, time_mask_BxT.bool(), neuron_mask_BxN)

    x_BxKxE = self.embed_spikes(patches_BxKxC)
    x_BxKxE = (F.softsign(x_BxKxE) if self.embed_act == "softsign" else x_BxKxE) * self.embed_scale
    space_SxH = self.space_pos_norm(self.embed_space_pos.weight[:S])
    time_TpxH = self.time_pos_norm(self.embed_time_pos.weight[:Tp])
    x_BxKxH = self.projection(x_BxKxE) + (time_TpxH[:, None] + space_SxH[None]).reshape(Tp * S, -1)[None]
    if self.embed_region is not None:
      region_BxSxH = self.region_norm(self.embed_region(self.patch_regions_SxP[session_idx_B]))
      x_BxKxH = x_BxKxH + region_BxSxH.repeat(1, Tp, 1)  # time-major tokens
    x_BxKxH = self.embed_dropout(x_BxKxH)

    prefix = []
    if self.embed_session is not None:
      prefix.append(self.embed_session(session_idx_B)[:, None])
    if self.embed_prompt is not None:
      prefix.append(self.embed_prompt.weight[int(prompt_idx)].expand(B, 1, -1))
    x_BxLxH = torch.cat([*prefix, x_BxKxH], dim=1)
    mask_Bx1xLxL = attention_mask(key_real_BxK, self.num_prefix, S, causal)[:, None]
    for layer in self.layers:
      x_BxLxH = layer(x_BxLxH, mask_Bx1xLxL)
    y_BxKxC = self.decoder(self.out_norm(x_BxLxH)[:, self.num_prefix:])
    y_BxTxN = y_BxKxC.reshape(B, Tp, S, Ft, Fn).transpose(2, 3).reshape(B, Tp * Ft, S * Fn)  # un-patch
    return y_BxTxN[:, :T, :N]


def from_state_dict(state_dict: dict[str, np.ndarray], cfg, num_neurons: Sequence[int], n_max: int, *,
                    session_regions: Sequence[Sequence[int]] | None = None, params=None) -> TorchNDT2:
  """A `TorchNDT2` holding an exported state dict; session i has num_neurons[i] neurons and session-token row i.

  With model.embed_region, the region table and its norm are ours only (the original never embeds regions, so
  the export leaves them out): they are read from `params` (our param tree, as `steps.split_params` gives it),
  and `session_regions` (each session's neuron region ids) gives each space patch its majority region as ours.
  """
  model = TorchNDT2(cfg, num_sessions=len(num_neurons), n_max=n_max, session_neurons=num_neurons,
                    session_regions=session_regions)
  t = lambda value: torch.from_numpy(np.array(value, np.float32))
  norm_names = ("weight", "bias") if cfg.norm == "layernorm" else ("scale",)
  e = "encoder.embedder."
  own = {}
  for name in ("embed_spikes", "projection"):
    own[f"{name}.weight"], own[f"{name}.bias"] = t(state_dict[f"{e}{name}.weight"]), t(state_dict[f"{e}{name}.bias"])
  for kind in ("space", "time"):
    own[f"embed_{kind}_pos.weight"] = t(state_dict[f"{e}embed_{kind}_pos.0.weight"])
    for p in norm_names:
      own[f"{kind}_pos_norm.{p}"] = t(state_dict[f"{e}embed_{kind}_pos.1.{p}"])
  for name in ("embed_session", "embed_prompt"):
    if getattr(model, name) is not None:
      own[f"{name}.weight"] = t(state_dict[f"{e}{name}.weight"])
  for key in state_dict:
    if key.startswith("encoder.layers."):  # encoder.layers.{l}.{ln1|attn.query|mlp.up_proj|...}.{weight|bias|scale}
      own[key[len("encoder."):].replace("attn.", "").replace("mlp.", "")] = t(state_dict[key])
  for p in norm_names:
    own[f"out_norm.{p}"] = t(state_dict[f"encoder.out_norm.{p}"])
  own["decoder.weight"], own["decoder.bias"] = t(state_dict["decoder.0.weight"]), t(state_dict["decoder.0.bias"])
  if model.embed_region is not None:
    if params is None:
      raise UserError("model.embed_region=True: the export has no region table; pass our params (params=...)")
    own["embed_region.weight"] = t(params["embed_region"]["embedding"])
    ours_norm = {"weight": "scale", "bias": "bias", "scale": "scale"}
    for p in norm_names:
      own[f"region_norm.{p}"] = t(params["region_norm"][ours_norm[p]])
  model.load_state_dict(own, strict=True)
  return model.eval()
