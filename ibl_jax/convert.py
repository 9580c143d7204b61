"""Import an original PyTorch MtM NDT1 checkpoint as one of our run directories, and export ours back.

  python -m ibl_jax.convert --from-torch model_best.pt --out results/mtm_torch --eids EID_A,EID_B
  python -m ibl_jax.convert --from-torch encoder.pt --out results/mtm_torch --eids EID_A,EID_B --num-heads 4

The input is either the original trainer's `model_best.pt` (`torch.save({"model": <NDT1>, "epoch": e})`, a
whole pickled module) or a plain state dict (`.pt`/`.bin`, possibly wrapped as {"model": ...} or
{"state_dict": ...}). The pickle is read without the original source code: every `models.*` and
`transformers.*` class is replaced by an empty `torch.nn.Module` subclass, which is enough for torch to rebuild
the parameters and for us to read the attributes that shapes do not carry (heads, eps, activations, the eid
table). The output is a run directory (`config.json`, `corpus.json`, `checkpoints/0/{params,opt_state,meta}`)
that `ibl_jax.runs.open_run` + `load_params` read like any run of ours, so evaluation and fine-tuning accept it.

Sessions: the original keys its stitchers by neuron count (`stitcher_dict.{N}`), so two sessions with equal N
share one, and it does not record which eid owns which stitcher. `--eids` names our sessions, one per stitcher
in the checkpoint's stitcher order, or with `--num-neurons` one N per eid (then sessions may share a stitcher;
each gets its own copy here). The session-token row of an eid comes from the pickle's eid table
(`encoder.embedder.eid_to_indx`); without a table, eid i takes row i.

PyTorch is needed only to read `.pt` files: `pip install -r requirements-convert.txt`. Unpickling can run code:
convert only checkpoints you trust (the loader admits only torch, numpy and container globals besides the
stand-ins, which narrows the risk but does not remove it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from flax import nnx

from ibl_jax import checkpoint, configs, masking
from ibl_jax.models import ndt1
from ibl_jax.errors import UserError
from ibl_jax import cli

REPO = Path(__file__).resolve().parents[1]
TORCH_HINT = "pip install torch==2.13.0 (or pip install -r requirements-convert.txt)"
DEFAULT_NUM_HEADS = 8  # the paper's; heads are not visible in tensor shapes
OUR_PROMPT_IDX = {name: masking.PROMPT_IDX[i] for i, name in enumerate(masking.MTM_SCHEMES)}
_STITCHER = re.compile(r"^encoder\.stitcher\.stitcher_dict\.([^.]+)\.weight$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


class ConvertError(UserError):
  """A checkpoint or request that cannot be converted; the message is one line, for the CLI."""


@dataclasses.dataclass
class TorchCheckpoint:
  """What a `.pt` file holds, as numpy: the state dict and the attributes read from a pickled module."""
  state_dict: dict[str, np.ndarray]
  attrs: dict[str, Any]  # empty for a plain state dict
  epoch: int | None = None


@dataclasses.dataclass(frozen=True)
class Session:
  eid: str
  stitcher: str  # the original's stitcher key, str(N)
  num_neurons: int
  row: int  # row of the original's session-token table


# --- reading a .pt file without the original code ----------------------------------------------------------

_STANDIN_PACKAGES = ("models", "transformers")  # the original's classes and HF's GELUActivation
_ALLOWED_PACKAGES = ("torch", "collections", "numpy", "_codecs", "copyreg")
_ALLOWED_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "range", "complex", "bytearray",
                     "int", "float", "bool", "str", "bytes", "object"}
_standins: dict[str, type] = {}


def _standin_class(module: str, name: str) -> type:
  """An empty nn.Module subclass named like the original; nn.Module.__setstate__ rebuilds its contents."""
  import torch  # pylint: disable=g-import-not-at-top
  key = f"{module}.{name}"
  if key not in _standins:
    _standins[key] = type(name, (torch.nn.Module,), {"__module__": f"standin.{module}"})
  return _standins[key]


class _StandinUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    package = module.split(".")[0]
    if package in _STANDIN_PACKAGES:
      return _standin_class(module, name)
    if package in _ALLOWED_PACKAGES or (package in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS):
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the pickle")


# torch.load calls `pickle_module.Unpickler` (and `.load` for the legacy format's headers).
_STANDIN_PICKLE = types.SimpleNamespace(__name__="standin_pickle", Unpickler=_StandinUnpickler, load=pickle.load)


def read_torch_checkpoint(path: str | Path) -> TorchCheckpoint:
  """Reads a whole pickled NDT1 or a plain state dict; tensors become float32 numpy arrays."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConvertError(f"reading PyTorch checkpoints needs PyTorch: {TORCH_HINT}") from None
  path = Path(path)
  if not path.is_file():
    raise ConvertError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STANDIN_PICKLE)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types for a bad file)
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {detail})") from None

  epoch = obj.get("epoch") if isinstance(obj, dict) else None
  if isinstance(obj, dict):
    obj = next((obj[k] for k in ("model", "state_dict") if k in obj), obj)
  if isinstance(obj, torch.nn.Module):
    tensors, attrs = obj.state_dict(), _architecture_attrs(obj)
  elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    tensors, attrs = obj, {}
  else:
    raise ConvertError(f"{path}: holds neither a model nor a state dict of tensors ({type(obj).__name__})")
  state_dict = {name: t.detach().to(torch.float32).numpy() for name, t in tensors.items()}
  if all(name.startswith("module.") for name in state_dict):  # saved from a DataParallel/DDP wrapper
    state_dict = {name.removeprefix("module."): v for name, v in state_dict.items()}
  return TorchCheckpoint(state_dict, attrs, None if epoch is None else int(epoch))


def _lookup(root, dotted: str):
  """root.a.b.0.c, or None where any step is missing (ModuleList items are attributes named "0", "1", ...)."""
  obj = root
  for part in dotted.split("."):
    obj = getattr(obj, part, None)
    if obj is None:
      return None
  return obj


def _architecture_attrs(model) -> dict[str, Any]:
  """Facts the tensor shapes do not carry, from a pickled original NDT1 (only those present)."""
  found = {
      "num_heads": _lookup(model, "encoder.layers.0.attn.n_heads"),
      "norm_eps": _lookup(model, "encoder.out_norm.eps"),
      "mlp_act": _lookup(model, "encoder.layers.0.mlp.act"),
      "embed_act": _lookup(model, "encoder.embedder.act"),
      "embed_scale": _lookup(model, "encoder.embedder.scale"),
      "use_rope": _lookup(model, "encoder.layers.0.use_rope"),
      "context_backward": _lookup(model, "encoder.context_backward"),
      "embed_dropout": _lookup(model, "encoder.embedder.dropout.p"),
      "dropout": _lookup(model, "encoder.layers.0.mlp.dropout.p"),
      "attention_dropout": _lookup(model, "encoder.layers.0.attn.attn_dropout"),
      "mask_to_indx": _lookup(model, "encoder.embedder.mask_to_indx"),
      "eid_to_indx": _lookup(model, "encoder.embedder.eid_to_indx"),
      "eid_lookup": _lookup(model, "encoder.embedder.eid_lookup"),
  }
  return {k: v for k, v in found.items() if v is not None}


# --- inferring our model config ----------------------------------------------------------------------------

def stitchers(state_dict: dict[str, np.ndarray]) -> dict[str, int]:
  """Stitcher key -> neuron count, in the checkpoint's order."""
  return {m.group(1): state_dict[name].shape[1] for name in state_dict if (m := _STITCHER.match(name))}


def _gelu_approximate(act) -> bool:
  name = type(act).__name__
  if name == "GELU":  # torch.nn.GELU
    return getattr(act, "approximate", "none") == "tanh"
  if name == "GELUActivation":  # HF "gelu": torch's exact erf form
    return False
  if name in ("NewGELUActivation", "PytorchGELUTanh", "GELUTanh", "FastGELUActivation"):
    return True
  raise ConvertError(f"MLP activation {name} is not supported (only GELU, exact or tanh)")


def _embed_act(act) -> str:
  acts = {"Softsign": "softsign", "Identity": "identity"}
  name = type(act).__name__
  if name not in acts:
    raise ConvertError(f"embedding activation {name} is not supported (only {', '.join(acts)})")
  return acts[name]


def infer_model_config(
    ckpt: TorchCheckpoint, num_heads: int | None = None, log: Callable[[str], None] = print
) -> ml_collections.ConfigDict:
  """Our `model` config for the checkpoint: sizes from tensor shapes, the rest from the pickle or defaults."""
  sd, attrs = ckpt.state_dict, ckpt.attrs
  required = ["encoder.embedder.embed_spikes.weight", "encoder.embedder.projection.weight",
              "encoder.layers.0.mlp.up_proj.weight"]
  missing = [name for name in required if name not in sd]
  if missing:
    raise ConvertError(f"not an NDT1 state dict: no {', '.join(missing)} (has {len(sd)} tensors)")
  if not stitchers(sd):
    raise ConvertError("no per-session stitchers (encoder.stitcher.stitcher_dict.*): only stitching "
                       "checkpoints can be converted")

  cfg = _load_default_config().model
  embed_out, channels = sd["encoder.embedder.embed_spikes.weight"].shape
  if embed_out % channels:
    raise ConvertError(f"embed_spikes maps {channels} -> {embed_out}: not a whole multiple")
  layer_ids = sorted({int(m.group(1)) for name in sd if (m := _LAYER.match(name))})
  if layer_ids != list(range(len(layer_ids))):
    raise ConvertError(f"encoder layers {layer_ids} are not numbered 0..L-1")
  cfg.update(n_channels=int(channels), embed_mult=int(embed_out // channels),
             hidden_size=int(sd["encoder.embedder.projection.weight"].shape[0]), num_layers=len(layer_ids),
             mlp_size=int(sd["encoder.layers.0.mlp.up_proj.weight"].shape[0]), stitching=True,
             use_prompt="encoder.embedder.embed_prompt.weight" in sd,
             use_session="encoder.embedder.embed_session.weight" in sd,
             norm="scalenorm" if "encoder.out_norm.scale" in sd else "layernorm",
             causal_prefix="original", dtype="float32", gelu_approximate=False, norm_eps=1e-5)
  if cfg.use_prompt:
    cfg.num_prompts = int(sd["encoder.embedder.embed_prompt.weight"].shape[0])
  _set_position(cfg, sd, attrs, log)
  cfg.num_heads = _num_heads(attrs, num_heads, log)
  if cfg.hidden_size % cfg.num_heads:
    raise ConvertError(f"hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
  _apply_pickled_attrs(cfg, attrs)
  return cfg


def _set_position(cfg, sd, attrs, log) -> None:
  learned = "encoder.embedder.embed_pos.weight" in sd
  if learned and attrs.get("use_rope"):
    raise ConvertError("the checkpoint uses both a learned position embedding and RoPE: not supported")
  if learned:
    cfg.position, cfg.max_bins = "learned", int(sd["encoder.embedder.embed_pos.weight"].shape[0])
  elif attrs.get("use_rope", True):
    cfg.position = "rope"
    if "use_rope" not in attrs:
      log("note: no position embedding in the state dict: assuming RoPE")
  else:
    raise ConvertError("the checkpoint has neither a position embedding nor RoPE: not supported")


def _num_heads(attrs, flag: int | None, log) -> int:
  if "num_heads" in attrs:
    if flag is not None and flag != attrs["num_heads"]:
      raise ConvertError(f"--num-heads {flag} contradicts the pickled model's {attrs['num_heads']} heads")
    return int(attrs["num_heads"])
  if flag is None:
    log(f"note: heads are not in tensor shapes and no pickled module says: assuming {DEFAULT_NUM_HEADS} "
        "(the paper's); pass --num-heads otherwise (the mtm_ndt1_small fixture has 4)")
    return DEFAULT_NUM_HEADS
  return int(flag)


def _apply_pickled_attrs(cfg, attrs) -> None:
  if attrs.get("context_backward", -1) != -1:
    raise ConvertError(f"limited attention context (context.backward={attrs['context_backward']}) is not "
                       "supported")
  mask_to_indx = attrs.get("mask_to_indx")
  if mask_to_indx is not None and dict(mask_to_indx) != OUR_PROMPT_IDX:
    raise ConvertError(f"prompt order {dict(mask_to_indx)} differs from ours {OUR_PROMPT_IDX}")
  if "mlp_act" in attrs:
    cfg.gelu_approximate = _gelu_approximate(attrs["mlp_act"])
  if "embed_act" in attrs:
    cfg.embed_act = _embed_act(attrs["embed_act"])
  for name in ("norm_eps", "embed_scale", "embed_dropout", "dropout", "attention_dropout"):
    if name in attrs:
      cfg[name] = float(attrs[name])


def _load_default_config() -> ml_collections.ConfigDict:
  return configs.get_config("ndt1")


# --- sessions ----------------------------------------------------------------------------------------------

def eid_rows(attrs: dict[str, Any]) -> dict[str, int] | None:
  """eid -> session-token row from the pickled eid table, or None for a plain state dict."""
  if "eid_to_indx" in attrs:
    return {str(k): int(v) for k, v in attrs["eid_to_indx"].items()}
  if "eid_lookup" in attrs:
    return {str(eid): i for i, eid in enumerate(attrs["eid_lookup"])}
  return None


def resolve_sessions(
    keys: dict[str, int],
    rows: dict[str, int] | None,
    eids: Sequence[str] | None,
    num_neurons: Sequence[int] | None,
    log: Callable[[str], None] = print,
) -> list[Session]:
  """Pairs each eid with a stitcher (by order, or by neuron count) and a session-token row."""
  counts = ", ".join(map(str, keys.values()))
  if eids is None:
    if rows is None or len(rows) != len(keys):
      table = f" and an eid table of {len(rows)} sessions" if rows else ""
      raise ConvertError(f"the checkpoint has {len(keys)} stitchers (N = {counts}){table} but does not say "
                         "which eid owns which stitcher: pass --eids, one per stitcher in that order (or "
                         "with --num-neurons)")
    eids = sorted(rows, key=rows.get)
  eids = list(eids)
  if len(set(eids)) != len(eids):
    raise ConvertError(f"--eids repeats an eid: {','.join(eids)}")
  if num_neurons is None:
    if len(eids) != len(keys):
      raise ConvertError(f"{len(eids)} eids for {len(keys)} stitchers (N = {counts}): pass one eid per "
                         "stitcher, or --num-neurons with one N per eid")
    stitcher_of = list(keys)
    log(_order_warning(eids, [keys[k] for k in stitcher_of]))
  else:
    if len(num_neurons) != len(eids):
      raise ConvertError(f"{len(eids)} eids but {len(num_neurons)} --num-neurons")
    owners: dict[int, list[str]] = {}
    for k, n in keys.items():
      owners.setdefault(n, []).append(k)
    unknown = [n for n in num_neurons if n not in owners]
    if unknown:
      raise ConvertError(f"no stitcher for N = {unknown}; the checkpoint has N = {counts}")
    ambiguous = sorted({n for n in num_neurons if len(owners[n]) > 1})
    if ambiguous:
      n = ambiguous[0]
      raise ConvertError(f"ambiguous: stitchers {', '.join(owners[n])} all have N = {n}, so the neuron count "
                         f"cannot say which one a session owns; pass --eids in the checkpoint's stitcher order "
                         f"without --num-neurons")
    stitcher_of = [owners[n][0] for n in num_neurons]
  if rows is None:
    log("note: no eid table in the checkpoint: eid i takes session-token row i")
    rows = {eid: i for i, eid in enumerate(eids)}
  unknown = [eid for eid in eids if eid not in rows]
  if unknown:
    raise ConvertError(f"eids not in the checkpoint's eid table (no session token): {', '.join(unknown)}")
  return [Session(eid, k, keys[k], rows[eid]) for eid, k in zip(eids, stitcher_of)]


def _order_warning(eids: Sequence[str], num_neurons: Sequence[int]) -> str:
  """The eid-to-stitcher table of a pairing by order, which nothing in the checkpoint can confirm."""
  table = "\n".join(f"    {eid}  ->  stitcher with N = {n}" for eid, n in zip(eids, num_neurons))
  return ("warning: the checkpoint does not record which eid owns which stitcher; --eids were paired with the "
          "stitchers in the checkpoint's order:\n" + table + "\n  check each session's neuron count against its "
          "stitcher's (python -m ibl_jax.data info SESSION), or pass --num-neurons N1,N2,... or --sessions "
          "DIR1,DIR2,... to pair them by neuron count instead")


# --- conversion --------------------------------------------------------------------------------------------

def convert(
    src: str | Path,
    out: str | Path,
    *,
    eids: Sequence[str] | None = None,
    num_neurons: Sequence[int] | None = None,
    num_heads: int | None = None,
    regions: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Path:
  """Converts a PyTorch NDT1 checkpoint into a run directory; returns its path."""
  out = Path(out)
  if (out / "config.json").exists() or (out / "checkpoints").exists():
    raise ConvertError(f"{out} already holds a run: choose a new --out")
  ckpt = read_torch_checkpoint(src)
  model_cfg = infer_model_config(ckpt, num_heads, log)
  sessions = resolve_sessions(stitchers(ckpt.state_dict), eid_rows(ckpt.attrs), eids, num_neurons, log)
  try:
    params = ndt1.params_from_torch_state_dict(
        ckpt.state_dict, model_cfg, [s.stitcher for s in sessions], [s.row for s in sessions])
  except ValueError as e:
    first, *problems = str(e).splitlines()
    raise ConvertError(f"{first} {'; '.join(p.strip() for p in problems)}") from None
  ignored = [f"{name} {list(v.shape)}" for name, v in ckpt.state_dict.items() if name.startswith("decoder.")]
  if ignored:
    log(f"ignored (the original's ssl head, unused with stitching): {', '.join(ignored)}")
  log(_summary(model_cfg, sessions))

  config = _load_default_config()
  config.model = model_cfg
  config.name = "ndt1_mtm_torch"
  config.run_name, config.results_dir = out.name, str(out.parent)
  config.data.sessions = ",".join(s.eid for s in sessions)
  meta = {"step": 0, "converted_from": str(Path(src).resolve()), "epoch": ckpt.epoch}
  _write_run(out, config, sessions, nnx.to_pure_dict(params), meta, list(regions))
  return out


def _summary(cfg, sessions: list[Session]) -> str:
  arch = (f"NDT1: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, MLP {cfg.mlp_size}, "
          f"channels {cfg.n_channels} x{cfg.embed_mult}, {cfg.position} positions"
          f"{f' ({cfg.max_bins} bins)' if cfg.position == 'learned' else ''}, {cfg.norm} eps {cfg.norm_eps:g}, "
          f"GELU {'tanh' if cfg.gelu_approximate else 'exact'}")
  rows = [f"  session {i}: {s.eid}  N={s.num_neurons}  stitcher {s.stitcher}  token row {s.row}"
          for i, s in enumerate(sessions)]
  return "\n".join([arch, *rows])


def _write_run(out: Path, config, sessions: list[Session], params, meta: dict, regions: list[str]) -> None:
  """Checkpoint first, then config.json and corpus.json: a failed save leaves no directory that looks whole."""
  ckpt = checkpoint.Checkpointer(out / "checkpoints", best_metric="")  # no metric: "best" means the latest
  # A converted run has no optimiser state; the placeholder keeps the checkpoint layout of our runs.
  ckpt.save(0, params=params, opt_state={"none": np.zeros(1, np.float32)}, meta=meta, force=True)
  ckpt.close()
  (out / "config.json").write_text(config.to_json_best_effort(indent=1))
  eids = [s.eid for s in sessions]
  (out / "corpus.json").write_text(json.dumps({"eids": eids, "sources": eids,
                                               "num_neurons": [s.num_neurons for s in sessions],
                                               "region_vocab": regions}, indent=1))


# --- export ------------------------------------------------------------------------------------------------

def params_to_torch_state_dict(params, cfg: ml_collections.ConfigDict, num_neurons: Sequence[int]
                               ) -> dict[str, np.ndarray]:
  """Our NDT1 params as an original state dict (key names and [out, in] weights), the inverse of the import.

  Session i becomes `stitcher_dict.{N_i}` / `stitch_decoder_dict.{N_i}` (its padded neurons dropped: they carry
  nothing) and row i of `embed_session`. `decoder.0.*` (the original's unused ssl head) is zeros, so the
  original's `load_state_dict(strict=True)` accepts the dict. `torch.save({k: torch.from_numpy(v) ...})`
  writes it.

  Raises:
    ValueError: for a config the original cannot express, or two sessions with equal N but different
      stitchers (the original keys stitchers by N).
  """
  if not cfg.stitching:
    raise UserError("the original keeps per-session stitchers only: cfg.stitching must be True")
  p = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  sd: dict[str, np.ndarray] = {}

  def put(name: str, value) -> None:
    sd[name] = np.ascontiguousarray(np.asarray(value, np.float32))

  def linear(theirs: str, node) -> None:
    put(f"{theirs}.weight", np.asarray(node["kernel"]).T)
    put(f"{theirs}.bias", node["bias"])

  def norm(theirs: str, node) -> None:
    if cfg.norm == "layernorm":
      put(f"{theirs}.weight", node["scale"])
      put(f"{theirs}.bias", node["bias"])
    else:
      put(f"{theirs}.scale", node["scale"])

  _export_stitchers(sd, p, num_neurons)
  linear("encoder.embedder.embed_spikes", p["embed_spikes"])
  linear("encoder.embedder.projection", p["projection"])
  if cfg.position == "learned":
    put("encoder.embedder.embed_pos.weight", p["embed_pos"]["embedding"])
  if cfg.use_prompt:
    put("encoder.embedder.embed_prompt.weight", p["embed_prompt"]["embedding"])
  if cfg.use_session:
    put("encoder.embedder.embed_session.weight", p["embed_session"]["embedding"])
  for l in range(cfg.num_layers):
    layer, prefix = _layer(p, l), f"encoder.layers.{l}"
    norm(f"{prefix}.ln1", layer["ln1"])
    for name in ("query", "key", "value", "out_proj"):
      linear(f"{prefix}.attn.{name}", layer["attn"][name])
    norm(f"{prefix}.ln2", layer["ln2"])
    linear(f"{prefix}.mlp.up_proj", layer["mlp"]["up_proj"])
    linear(f"{prefix}.mlp.down_proj", layer["mlp"]["down_proj"])
  norm("encoder.out_norm", p["out_norm"])
  _export_stitchers(sd, p, num_neurons, decoder=True)
  put("decoder.0.weight", np.zeros((cfg.n_channels, cfg.hidden_size)))
  put("decoder.0.bias", np.zeros(cfg.n_channels))
  return sd


def _layer(p: dict, l: int) -> dict:
  """Layer l of a pure params dict (keys are ints from nnx, possibly strings after a JSON-like round trip)."""
  return p["layers"][l] if l in p["layers"] else p["layers"][str(l)]


def _export_stitchers(sd: dict, p: dict, num_neurons: Sequence[int], decoder: bool = False) -> None:
  """stitcher_dict.{N} (stitch-in, [C, N]) or stitch_decoder_dict.{N} (stitch-out, [N, H]), one per N."""
  node = p["stitch_out" if decoder else "stitch_in"]
  kernel, bias = np.asarray(node["kernel"], np.float32), np.asarray(node["bias"], np.float32)
  if len(num_neurons) != kernel.shape[0]:
    raise UserError(f"{len(num_neurons)} neuron counts for {kernel.shape[0]} sessions")
  prefix = "stitch_decoder.stitch_decoder_dict" if decoder else "encoder.stitcher.stitcher_dict"
  for i, n in enumerate(num_neurons):
    if decoder:  # kernel [S, H, N_max] -> weight [N, H]
      weight, b = kernel[i, :, :n].T, bias[i, :n]
    else:  # kernel [S, N_max, C] -> weight [C, N]
      weight, b = kernel[i, :n].T, bias[i]
    name = f"{prefix}.{n}"
    if f"{name}.weight" in sd:
      if not (np.array_equal(sd[f"{name}.weight"], weight) and np.array_equal(sd[f"{name}.bias"], b)):
        raise UserError(f"two sessions have N={n} but different {'stitch-out' if decoder else 'stitch-in'} "
                         "layers: the original keys stitchers by neuron count and can hold only one")
      continue
    sd[f"{name}.weight"] = np.ascontiguousarray(weight)
    sd[f"{name}.bias"] = np.ascontiguousarray(b)


# --- CLI ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):

  def error(self, message):  # one line, exit 2 (argparse's default also prints the usage)
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _csv(cast):
  return lambda text: [cast(x.strip()) for x in text.split(",") if x.strip()]


def session_neuron_counts(spec: str) -> tuple[list[str], list[int]]:
  """(eids, neuron counts) of the sessions named by `spec`, read from the sessions themselves."""
  from ibl_jax.data import sessions as sessions_lib  # pylint: disable=g-import-not-at-top
  corpus = sessions_lib.load_corpus(spec)
  return corpus.eids, [s.num_neurons for s in corpus.sessions]


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="python -m ibl_jax.convert",
      description="Convert an original PyTorch MtM NDT1 checkpoint (the trainer's model_best.pt, or a plain "
                  "state dict .pt/.bin) into a run directory of ours (config.json, corpus.json, Orbax "
                  "checkpoints/0) for evaluation and fine-tuning. Needs PyTorch: " + TORCH_HINT + ".",
      epilog="Example: python -m ibl_jax.convert --from-torch model_best.pt --out results/mtm_torch "
             "--eids 5dcee0eb-b34d-4652-acc3-d10afc6eae68,c7bf2d49-4937-4597-b307-9f39cb1c7b16")
  parser.add_argument("--from-torch", required=True, metavar="PATH", help="the .pt/.bin file to convert")
  parser.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to create")
  parser.add_argument("--eids", type=_csv(str), metavar="A,B,...",
                      help="our sessions, one eid per stitcher in the checkpoint's stitcher order (or with "
                           "--num-neurons). Optional only when the pickled eid table has one eid per stitcher.")
  parser.add_argument("--num-neurons", type=_csv(int), metavar="N1,N2,...",
                      help="neuron count of each --eids session; picks its stitcher (the original keys "
                           "stitchers by N, so sessions with equal N share one)")
  parser.add_argument("--sessions", metavar="PATHS",
                      help="the sessions themselves (a comma list of session directories, an eids file or a "
                           "directory of sessions): their eids and neuron counts pair them with stitchers by N "
                           "(instead of --eids/--num-neurons)")
  parser.add_argument("--num-heads", type=int, metavar="H",
                      help=f"attention heads when the file is a plain state dict (shapes do not show them); "
                           f"default {DEFAULT_NUM_HEADS} (the paper's). The mtm_ndt1_small fixture has 4. "
                           "A pickled model's own value is used otherwise.")
  parser.add_argument("--regions", type=_csv(str), default=[], metavar="R1,R2,...",
                      help="region vocabulary for corpus.json (default: empty)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  cli.add_verbosity_flag(parser)
  args = parser.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  start = time.perf_counter()
  try:
    eids, num_neurons = args.eids, args.num_neurons
    if args.sessions:
      if eids or num_neurons:
        raise ConvertError("give either --sessions or --eids/--num-neurons, not both")
      eids, num_neurons = session_neuron_counts(args.sessions)
    out = convert(args.from_torch, args.out, eids=eids, num_neurons=num_neurons,
                  num_heads=args.num_heads, regions=args.regions)
  except (UserError, OSError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return 2
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
