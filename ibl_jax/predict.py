"""The model's predicted firing rates for every trial of a session, as .npz or NWB.

  python -m ibl_jax.predict --checkpoint results/ndt1_mtm --sessions data/mine/SESSION --out predictions/
  python -m ibl_jax.predict --checkpoint RUN --sessions S --out DIR --format nwb --mode co_smooth

Modes: `rates` (default) gives the model every neuron and every bin (the denoised rates, as the behaviour
decoders see them); `co_smooth` predicts each neuron from all the others (the neuron held out in turn).

`.npz` per session (`OUT/<eid>.npz`): `rates` float32 [K, T, N] in spikes/s, `counts` uint8 [K, T, N], `split`
[K] (train/val/test), `trial_idx` [K] (the row in the source trials table, when the session has that column;
else the row in its split), `window_start` [K] seconds when known, neuron `uuids`, `regions`, `depths`,
`binsize`. Trials are ordered train, val, test.

NWB (`OUT/<eid>.nwb`): when the session was prepared from an NWB file (its `prepare.json` names it), a copy
of that file (its units, trials and everything else) with a processing module `ibl_jax` added; otherwise a new
file holding only that module. The module has `predicted_rates`, a TimeSeries of rates [K·T, N] (spikes/s)
stamped with each bin's start time (or the bin index when the window starts are unknown), and a table
`prediction_trials` (trial_idx, split, window_start) and `prediction_units` (uuid, region, depth).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ibl_jax import cli
from ibl_jax.errors import UserError

MODES = ("rates", "co_smooth")


def session_predictions(predict, session, session_idx: int, n_max: int, *, chunk_size: int,
                        mode: str = "rates", progress: bool = False) -> dict[str, np.ndarray]:
  """Rates of every trial (splits in train, val, test order) and the metadata of the npz."""
  from ibl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ibl_jax.data import schema, sessions as sessions_lib  # pylint: disable=g-import-not-at-top
  names = [s for s in evaluate.SPLIT_ORDER if s in session.splits]
  spikes_KxTxN = np.concatenate([session.splits[s].spikes for s in names])
  offsets = evaluate.trial_offsets(session)
  trial_idx_K = np.concatenate([offsets[s] + np.arange(session.splits[s].spikes.shape[0]) for s in names])
  _, T, N = spikes_KxTxN.shape
  if mode == "rates":  # one variant hiding nothing: what the behaviour decoders see
    ones_1xN, all_T = np.ones((1, N), bool), np.ones(T, bool)
    spec = evaluate.LeaveOut(evaluate.PROMPT["neuron"], False, ones_1xN, ones_1xN, all_T, all_T)
  else:  # each neuron held out in turn
    spec = evaluate.leave_out("co_smooth", session.regions, T)
  log_rates_KxTxN = evaluate.heldout_log_rates(predict, spec, spikes_KxTxN, session_idx=session_idx,
                                               trial_idx_K=trial_idx_K, n_max=n_max, chunk_size=chunk_size,
                                               desc=f"{session.eid[:8]} {mode}", progress=progress)
  out = {"rates": (np.exp(log_rates_KxTxN) / schema.BINSIZE_S).astype(np.float32), "counts": spikes_KxTxN,
         "split": np.concatenate([[s] * session.splits[s].spikes.shape[0] for s in names]),
         "uuids": np.asarray(session.uuids, str), "regions": np.asarray(session.regions, str),
         "depths": np.asarray(session.depths, np.float32), "binsize": np.float64(schema.BINSIZE_S),
         "eid": np.asarray(session.eid)}
  raw = sessions_lib.load_raw(session.source)
  columns = {}
  for name in ("trial_idx", "window_start"):
    if all(name in raw[s].column_names for s in names):
      columns[name] = np.concatenate([np.asarray(raw[s][name])[session.splits[s].trial_ids] for s in names])
  out["trial_idx"] = columns.get("trial_idx", np.concatenate([session.splits[s].trial_ids for s in names]))
  if "window_start" in columns:
    out["window_start"] = columns["window_start"].astype(np.float64)
  return out


def _source_nwb(session) -> Path | None:
  """The NWB file the session was prepared from, per its `prepare.json`, if it still exists."""
  meta = Path(session.source) / "prepare.json"
  if not meta.exists():
    return None
  info = json.loads(meta.read_text())
  source = Path(info.get("source", ""))
  return source if info.get("reader") == "nwb" and source.is_file() else None


def write_nwb(pred: dict[str, np.ndarray], out_path: Path, source: Path | None) -> None:
  """`pred` as a processing module `ibl_jax` in a copy of `source` (or in a new NWB file)."""
  import datetime  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  from hdmf.common import DynamicTable, VectorData  # pylint: disable=g-import-not-at-top
  from pynwb import NWBHDF5IO, NWBFile, TimeSeries  # pylint: disable=g-import-not-at-top
  K, T, N = pred["rates"].shape
  binsize = float(pred["binsize"])
  if "window_start" in pred:
    stamps = (pred["window_start"][:, None] + binsize * np.arange(T)).ravel()
    description = "timestamps: the start of each bin (window_start + binsize * bin)"
  else:
    stamps = np.arange(K * T, dtype=np.float64) * binsize
    description = "timestamps: trial * T + bin, times binsize (window starts unknown)"

  def module_into(nwbfile):
    module = nwbfile.create_processing_module("ibl_jax", "ibl_jax model predictions (python -m ibl_jax.predict)")
    module.add(TimeSeries(name="predicted_rates", data=pred["rates"].reshape(K * T, N), unit="spikes/s",
                          timestamps=stamps, description=f"predicted rates [trial x bin, neuron]; {description}"))
    trials = {"trial_idx": pred["trial_idx"].astype(np.int64), "split": pred["split"].astype(str)}
    if "window_start" in pred:
      trials["window_start"] = pred["window_start"]
    module.add(DynamicTable(name="prediction_trials", description="one row per predicted trial, in rate order",
                            columns=[VectorData(name=k, description=k, data=v) for k, v in trials.items()]))
    units = {"uuid": pred["uuids"], "region": pred["regions"], "depth": pred["depths"].astype(np.float64)}
    module.add(DynamicTable(name="prediction_units", description="one row per neuron, in rate order",
                            columns=[VectorData(name=k, description=k, data=v) for k, v in units.items()]))

  tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
  if source is not None:
    with NWBHDF5IO(str(source), mode="r", load_namespaces=True) as src:
      nwbfile = src.read()
      module_into(nwbfile)
      nwbfile.set_modified()
      with NWBHDF5IO(str(tmp), mode="w") as dst:
        dst.export(src_io=src, nwbfile=nwbfile)
  else:
    nwbfile = NWBFile(session_description=f"ibl_jax predictions for session {pred['eid']}",
                      identifier=str(uuid.uuid4()), session_start_time=datetime.datetime.now(datetime.timezone.utc),
                      session_id=str(pred["eid"]))
    module_into(nwbfile)
    with NWBHDF5IO(str(tmp), mode="w") as dst:
      dst.write(nwbfile)
  tmp.replace(out_path)


def predict_run(checkpoint: str | Path, sessions: str | Sequence[str] | None, out_dir: str | Path, *,
                fmt: str = "npz", mode: str = "rates", chunk_size: int = 0, progress: bool = True) -> list[Path]:
  """Writes `out_dir/<eid>.<fmt>` for each session; returns the paths."""
  import jax  # pylint: disable=g-import-not-at-top
  from ibl_jax import evaluate, parallel, runs  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise UserError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
  if fmt not in ("npz", "nwb"):
    raise UserError(f"--format must be npz or nwb, not {fmt!r}")
  run = runs.open_run(checkpoint)
  session_list = evaluate.load_eval_sessions(run, sessions)
  graphdef, params, _ = runs.load_params(run, runs.step_of(checkpoint))
  mesh = parallel.make_mesh()
  if chunk_size <= 0:
    chunk_size = evaluate.auto_chunk_size(run.config.model, max(s.num_bins for s in session_list), run.n_max,
                                          mesh.devices.flatten())
  chunk_size = math.ceil(chunk_size / mesh.devices.size) * mesh.devices.size
  predict = evaluate.model_predict(graphdef, params, mesh)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for s in session_list:
    pred = session_predictions(predict, s, s.session_idx, run.n_max, chunk_size=chunk_size, mode=mode,
                               progress=progress)
    path = out_dir / f"{s.eid}.{fmt}"
    if jax.process_index() == 0:
      if fmt == "npz":
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **pred)
        tmp.replace(path)
      else:
        write_nwb(pred, path, _source_nwb(s))
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ibl_jax.predict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or RUN/checkpoints/<step>")
  p.add_argument("--sessions", default=None, help="sessions: a directory, an eids file or a comma list (default: "
                 "the run's own); each needs stitching in the checkpoint (fine-tune on new sessions first)")
  p.add_argument("--out", required=True, help="output directory: <eid>.npz or <eid>.nwb per session")
  p.add_argument("--format", default="npz", choices=("npz", "nwb"))
  p.add_argument("--mode", default="rates", choices=MODES, help="rates: nothing held out (default); "
                 "co_smooth: each neuron predicted from the others")
  p.add_argument("--chunk-size", type=int, default=0, help="inputs per compiled forward call (0: automatic)")
  p.add_argument("--no-progress", action="store_true")
  cli.add_verbosity_flag(p)
  args = p.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  if not args.verbosity:
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on opening a checkpoint read-only
  cli.split_cpu_like_run(args.checkpoint)
  paths, status = cli.run_guarded(predict_run, args.checkpoint, args.sessions, args.out, fmt=args.format,
                                  mode=args.mode, chunk_size=args.chunk_size, progress=not args.no_progress)
  if status:
    return status
  for path in paths:
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
