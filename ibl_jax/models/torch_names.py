"""One name table per model family maps our params to an original PyTorch state dict, in both directions.

A `Name` says where one torch tensor lives in our param tree: `ours` (a path), `theirs` (the torch key), whether
the value is transposed (torch `nn.Linear.weight` is [out, in]; a flax kernel is [in, out]), and `index`, the
part of our param it fills (a per-session slice of a stacked kernel, e.g. `(1, slice(0, 37))`). `rows` selects
rows of a torch table on import (the original's session-token table has one row per eid it knows; we keep our
sessions'). Import and export both read the same list, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from ibl_jax.errors import UserError


DEFAULT_NUM_HEADS = 8  # the paper's; heads are not visible in tensor shapes


class ConvertError(UserError):
  """A checkpoint or request that cannot be converted; the message is one line, for the CLI."""


@dataclasses.dataclass
class TorchCheckpoint:
  """What a `.pt` file holds, as numpy: the state dict and the attributes read from a pickled module."""
  state_dict: dict[str, np.ndarray]
  attrs: dict[str, Any]  # empty for a plain state dict
  epoch: int | None = None


@dataclasses.dataclass(frozen=True)
class Name:
  ours: tuple  # path in our params, e.g. ("layers", 0, "attn", "query", "kernel")
  theirs: str  # torch state-dict key
  transpose: bool = False  # torch [out, in] <-> our [in, out]
  index: tuple = ()  # the part of our param that this tensor fills (empty: all of it)
  rows: tuple | None = None  # import: keep these rows of the torch tensor (export writes ours whole)


@dataclasses.dataclass(frozen=True)
class TorchSession:
  """One of our sessions in an original checkpoint."""
  eid: str
  num_neurons: int
  row: int  # row of the original's session-token table
  key: str = ""  # family-specific (NDT1: the stitcher key, str(N))


def linear(ours: tuple, theirs: str) -> list[Name]:
  return [Name((*ours, "kernel"), f"{theirs}.weight", transpose=True), Name((*ours, "bias"), f"{theirs}.bias")]


def layernorm(ours: tuple, theirs: str) -> list[Name]:
  return [Name((*ours, "scale"), f"{theirs}.weight"), Name((*ours, "bias"), f"{theirs}.bias")]


def norm(cfg, ours: tuple, theirs: str) -> list[Name]:
  return layernorm(ours, theirs) if cfg.norm == "layernorm" else [Name((*ours, "scale"), f"{theirs}.scale")]


def encoder_layers(cfg) -> list[Name]:
  """The pre-norm layers shared by the NDT families (`layers.EncoderLayer` mirrors the original's names)."""
  names = []
  for l in range(cfg.num_layers):
    ours, theirs = ("layers", l), f"encoder.layers.{l}"
    names += norm(cfg, (*ours, "ln1"), f"{theirs}.ln1")
    for proj in ("query", "key", "value", "out_proj"):
      names += linear((*ours, "attn", proj), f"{theirs}.attn.{proj}")
    names += norm(cfg, (*ours, "ln2"), f"{theirs}.ln2")
    names += linear((*ours, "mlp", "up_proj"), f"{theirs}.mlp.up_proj")
    names += linear((*ours, "mlp", "down_proj"), f"{theirs}.mlp.down_proj")
  names += norm(cfg, ("out_norm",), "encoder.out_norm")
  return names


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def import_params(state_dict: dict[str, np.ndarray], names: Sequence[Name], abstract: nnx.State,
                  ignored: Sequence[str] = (), what: str = "the model") -> nnx.State:
  """Fills `abstract` (an nnx.State of Params, e.g. from `nnx.eval_shape`) from a torch state dict.

  Raises:
    UserError: listing every missing, unmapped or misshaped tensor.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  target = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  values = {path: np.zeros(spec.shape, np.float32) for path, spec in target.items()}
  problems, covered = [], set()
  for name in names:
    if name.theirs not in sd:
      problems.append(f"missing {name.theirs}")
      continue
    if name.ours not in values:
      problems.append(f"mapped to unknown param {_path(name.ours)}")
      continue
    value = sd[name.theirs]
    if name.rows is not None:
      if max(name.rows, default=-1) >= value.shape[0]:
        problems.append(f"rows {list(name.rows)} out of range for {name.theirs} {value.shape}")
        continue
      value = value[np.asarray(name.rows, int)]
    value = value.T if name.transpose else value
    slot = values[name.ours][name.index] if name.index else values[name.ours]
    if slot.shape != value.shape:
      part = f" (part, from {name.theirs})" if name.index else ""
      problems.append(f"param {_path(name.ours)}: got {value.shape}, model wants {slot.shape}{part}")
      continue
    if name.index:
      values[name.ours][name.index] = value
    else:
      values[name.ours] = value
    covered.add(name.ours)
  used = {name.theirs for name in names}
  problems += [f"unmapped {k} {sd[k].shape}" for k in sd if k not in used and not k.startswith(tuple(ignored))]
  problems += [f"no tensor for param {_path(p)}" for p in target if p not in covered and
               not any(n.ours == p for n in names)]
  if problems:
    raise UserError(f"cannot map the torch state dict onto {what}:\n  " + "\n  ".join(problems))
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in values.items()}))
  return abstract


def export_params(params, names: Sequence[Name]) -> dict[str, np.ndarray]:
  """Our params as a torch state dict (float32, contiguous), the inverse of `import_params`.

  Raises:
    UserError: when two of our values would land on one torch key with different contents.
  """
  p = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  flat = {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path): v
          for path, v in traverse_util.flatten_dict(p).items()}
  sd: dict[str, np.ndarray] = {}
  for name in names:
    value = np.asarray(flat[name.ours], np.float32)
    value = value[name.index] if name.index else value
    value = np.ascontiguousarray(value.T if name.transpose else value)
    if name.theirs in sd and not np.array_equal(sd[name.theirs], value):
      raise UserError(f"two of our parameters map to {name.theirs} with different values (the original keeps "
                      f"one)")
    sd[name.theirs] = value
  return sd


# --- facts a family's `config_from_torch` reads from a pickled original module ----------------------------


def gelu_approximate(act) -> bool:
  name = type(act).__name__
  if name == "GELU":  # torch.nn.GELU
    return getattr(act, "approximate", "none") == "tanh"
  if name == "GELUActivation":  # HF "gelu": torch's exact erf form
    return False
  if name in ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh", "FastGELUActivation"):
    return True
  raise ConvertError(f"MLP activation {name} is not supported (only GELU, exact or tanh)")


def embed_act(act) -> str:
  acts = {"Softsign": "softsign", "Identity": "identity"}
  name = type(act).__name__
  if name not in acts:
    raise ConvertError(f"embedding activation {name} is not supported (only {', '.join(acts)})")
  return acts[name]


def num_heads(attrs: dict, flag: int | None, log: Callable[[str], None], fixture_hint: str = "") -> int:
  """Heads from the pickle, else `flag`, else the paper's (shapes do not show them)."""
  if "num_heads" in attrs:
    if flag is not None and flag != attrs["num_heads"]:
      raise ConvertError(f"--num-heads {flag} contradicts the pickled model's {attrs['num_heads']} heads")
    return int(attrs["num_heads"])
  if flag is None:
    log(f"note: heads are not in tensor shapes and no pickled module says: assuming {DEFAULT_NUM_HEADS} "
        f"(the paper's); pass --num-heads otherwise{fixture_hint}")
    return DEFAULT_NUM_HEADS
  return int(flag)


def apply_pickled_attrs(cfg, attrs: dict, prompt_idx: dict[str, int]) -> None:
  """Activations, eps, scale and dropouts of a pickled original onto `cfg` (only those present)."""
  if attrs.get("context_backward", -1) != -1:
    raise ConvertError(f"limited attention context (context.backward={attrs['context_backward']}) is not "
                       "supported")
  mask_to_indx = attrs.get("mask_to_indx")
  if mask_to_indx is not None and dict(mask_to_indx) != prompt_idx:
    raise ConvertError(f"prompt order {dict(mask_to_indx)} differs from ours {prompt_idx}")
  if "mlp_act" in attrs:
    cfg.gelu_approximate = gelu_approximate(attrs["mlp_act"])
  if "embed_act" in attrs:
    cfg.embed_act = embed_act(attrs["embed_act"])
  for name in ("norm_eps", "embed_scale", "embed_dropout", "dropout", "attention_dropout"):
    if name in attrs:
      cfg[name] = float(attrs[name])


def eid_rows(attrs: dict[str, Any]) -> dict[str, int] | None:
  """eid -> session-token row from the pickled eid table, or None for a plain state dict."""
  if "eid_to_indx" in attrs:
    return {str(k): int(v) for k, v in attrs["eid_to_indx"].items()}
  if "eid_lookup" in attrs:
    return {str(eid): i for i, eid in enumerate(attrs["eid_lookup"])}
  return None


def session_rows(rows: dict[str, int] | None, eids: Sequence[str], log: Callable[[str], None]) -> dict[str, int]:
  """eid -> session-token row; without a table eid i takes row i."""
  if rows is None:
    log("note: no eid table in the checkpoint: eid i takes session-token row i")
    return {eid: i for i, eid in enumerate(eids)}
  unknown = [eid for eid in eids if eid not in rows]
  if unknown:
    raise ConvertError(f"eids not in the checkpoint's eid table (no session token): {', '.join(unknown)}")
  return rows
