"""Import an original PyTorch MtM checkpoint (NDT1 or NDT2) as one of our run directories, and export ours back.

  python -m ibl_jax.convert --from-torch model_best.pt --out results/mtm_torch --eids EID_A,EID_B
  python -m ibl_jax.convert --from-torch encoder.pt --out results/mtm_torch --eids EID_A,EID_B --num-heads 4
  python -m ibl_jax.convert --from-torch stpatch.pt --out results/ndt2_torch --eids EID_A,EID_B --num-neurons 37,52

The input is either the original trainer's `model_best.pt` (`torch.save({"model": <module>, "epoch": e})`, a
whole pickled module) or a plain state dict (`.pt`/`.bin`, possibly wrapped as {"model": ...} or
{"state_dict": ...}). The pickle is read without the original source code: every `models.*` and
`transformers.*` class is replaced by an empty `torch.nn.Module` subclass, which is enough for torch to rebuild
the parameters and for us to read the attributes that shapes do not carry (heads, eps, activations, the eid
table). The model family is recognised from the tensor names (`ibl_jax.models.detect_torch_family`); the
family's contract infers our config, pairs eids with its sessions and maps the tensors through its one name
table. The output is a run directory (`config.json`, `corpus.json`, `checkpoints/0/{params,opt_state,meta}`)
that `ibl_jax.runs.open_run` + `load_params` read like any run of ours, so evaluation and fine-tuning accept it.

Sessions. NDT1 keys its stitchers by neuron count (`stitcher_dict.{N}`), so two sessions with equal N share one,
and it does not record which eid owns which stitcher: `--eids` names our sessions, one per stitcher in the
checkpoint's stitcher order, or with `--num-neurons` one N per eid. NDT2 (STPatch) has no stitchers and does not
store neuron counts: pass `--eids` and `--num-neurons`. The session-token row of an eid comes from the pickle's
eid table (`encoder.embedder.eid_to_indx`); without a table, eid i takes row i.

PyTorch is needed only to read `.pt` files: `pip install -r requirements-convert.txt`. Unpickling can run code:
convert only checkpoints you trust (the loader admits only torch, numpy and container globals besides the
stand-ins, which narrows the risk but does not remove it).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from ibl_jax import checkpoint, configs, models
from ibl_jax.models import ndt1, torch_names
from ibl_jax.models.torch_names import DEFAULT_NUM_HEADS, ConvertError, TorchCheckpoint, TorchSession
from ibl_jax.errors import UserError
from ibl_jax import cli

REPO = Path(__file__).resolve().parents[1]
TORCH_HINT = "pip install torch==2.13.0 (or pip install -r requirements-convert.txt)"
# NDT1-specific helpers, kept under their old names.
infer_model_config, resolve_sessions, stitchers = ndt1.config_from_torch, ndt1.resolve_sessions, ndt1.stitchers
eid_rows = torch_names.eid_rows


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
  """Reads a whole pickled model or a plain state dict; tensors become float32 numpy arrays."""
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
  """Facts the tensor shapes do not carry, from a pickled original model (only those present)."""
  found = {
      "num_heads": _lookup(model, "encoder.layers.0.attn.n_heads"),
      "norm_eps": _lookup(model, "encoder.out_norm.eps"),
      "mlp_act": _lookup(model, "encoder.layers.0.mlp.act"),
      "embed_act": _lookup(model, "encoder.embedder.act"),
      "embed_scale": _lookup(model, "encoder.embedder.scale"),
      "context_backward": _lookup(model, "encoder.context_backward"),
      "embed_dropout": _lookup(model, "encoder.embedder.dropout.p"),
      "dropout": _lookup(model, "encoder.layers.0.mlp.dropout.p"),
      "attention_dropout": _lookup(model, "encoder.layers.0.attn.attn_dropout"),
      "mask_to_indx": _lookup(model, "encoder.embedder.mask_to_indx"),
      "eid_to_indx": _lookup(model, "encoder.embedder.eid_to_indx"),
      "eid_lookup": _lookup(model, "encoder.embedder.eid_lookup"),
  }
  for name in models.known():  # each family's own facts (e.g. NDT2's patch sizes)
    found.update({ours: _lookup(model, theirs) for ours, theirs in models.family(name).TORCH_ATTRS.items()})
  return {k: v for k, v in found.items() if v is not None}


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
  """Converts an original PyTorch checkpoint into a run directory; returns its path."""
  out = Path(out)
  if (out / "config.json").exists() or (out / "checkpoints").exists():
    raise ConvertError(f"{out} already holds a run: choose a new --out")
  ckpt = read_torch_checkpoint(src)
  fam = models.detect_torch_family(ckpt.state_dict)
  model_cfg = fam.config_from_torch(ckpt, num_heads=num_heads, log=log)
  sessions = fam.torch_sessions(ckpt, eids, num_neurons, log)
  try:
    params = fam.params_from_torch(ckpt.state_dict, model_cfg, sessions)
  except UserError as e:
    first, *problems = str(e).splitlines()
    raise ConvertError(f"{first} {'; '.join(p.strip() for p in problems)}") from None
  ignored = [f"{name} {list(v.shape)}" for name, v in ckpt.state_dict.items()
             if name.startswith(fam.TORCH_IGNORED)]
  if ignored:
    log(f"ignored: {', '.join(ignored)}")
  log(_summary(model_cfg, sessions))

  config = configs.get_config(model_cfg.name)
  config.model = model_cfg
  config.name = f"{model_cfg.name}_mtm_torch"
  config.run_name, config.results_dir = out.name, str(out.parent)
  config.data.sessions = ",".join(s.eid for s in sessions)
  meta = {"step": 0, "converted_from": str(Path(src).resolve()), "epoch": ckpt.epoch}
  _write_run(out, config, sessions, nnx.to_pure_dict(params), meta, list(regions))
  return out


def _summary(cfg, sessions: Sequence[TorchSession]) -> str:
  shape_fields = [f"{k}={cfg[k]}" for k in models.of(cfg).ARCHITECTURE if k in cfg]
  rows = [f"  session {i}: {s.eid}  N={s.num_neurons}{f'  stitcher {s.key}' if s.key else ''}  token row {s.row}"
          for i, s in enumerate(sessions)]
  return "\n".join([f"{cfg.name}: {', '.join(shape_fields)}", *rows])


def _write_run(out: Path, config, sessions: list[TorchSession], params, meta: dict, regions: list[str]) -> None:
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

def params_to_torch_state_dict(params, cfg, num_neurons: Sequence[int], rows: Sequence[int] | None = None
                               ) -> dict[str, np.ndarray]:
  """Our params as an original state dict (key names and [out, in] weights), the inverse of the import.

  Session i has `num_neurons[i]` neurons and becomes row i of the session-token table (NDT1: and stitcher
  `{N_i}`). `torch.save({k: torch.from_numpy(v) ...})` writes it.
  """
  sessions = [TorchSession(str(i), int(n), i if rows is None else rows[i], str(n))
              for i, n in enumerate(num_neurons)]
  return models.of(cfg).params_to_torch(params, cfg, sessions)


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
      description="Convert an original PyTorch MtM NDT1 or NDT2 (STPatch) checkpoint (the trainer's model_best.pt, or a plain "
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
                      help="neuron count of each --eids session; NDT1: picks its stitcher (the original keys "
                           "stitchers by N, so sessions with equal N share one); NDT2: required (not stored)")
  parser.add_argument("--sessions", metavar="PATHS",
                      help="the sessions themselves (a comma list of session directories, an eids file or a "
                           "directory of sessions): their eids and neuron counts (NDT1: pair them with stitchers "
                           "by N), instead of --eids/--num-neurons")
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
