"""Turn a recording (spike times, units, trials, behaviour traces) into a session in our schema.

Every data source is one reader (`ibl_jax.data.alf`, `ibl_jax.data.nwb`) that returns a `Recording`; this
module holds the one protocol they share (the original's data preparation) and the writer:

  window     t0 = align event (default stimulus onset) − 0.5 s; T = 100 bins of 20 ms; bin k of a trial counts
             the spikes in [t0 + 0.02 k, t0 + 0.02 (k+1)).
  trials     kept iff stimOn, choice, feedback time, probabilityLeft, firstMovement and feedbackType (and the
             align event) are present (not NaN), choice ≠ 0 and 0.08 s ≤ firstMovement − stimOn ≤ 2 s.
  behaviour  choice ±1; block = probabilityLeft; reward = 1 where feedbackType is 1, else 0; wheel-speed =
             |position(right edge) − position(left edge)| / 20 ms per bin (positions linearly interpolated:
             the bin's mean speed); whisker-motion-energy sampled at each bin's right edge by linear
             interpolation over the non-NaN samples (as the original).
  units      QC label ≥ `qc` (1: IBL "good"; None keeps every unit).
  counts     above 255 clipped to 255, with a warning giving how many entries.
  splits     a seeded 70/10/20 permutation of the kept trials (each split in trial order); every row carries
             `trial_idx`, its row in the source trials table.
  unaligned  consecutive 2 s chunks [start + 2c, start + 2c + 2) from the first spike, spikes and neuron
             metadata only; `trial_idx` is the chunk number.

The session is written to a temporary sibling of OUT and renamed into place at the end, so a failure leaves
nothing behind. `prepare.json` beside the splits records the source, the options and the counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ibl_jax.data import schema
from ibl_jax.errors import UserError

N_BINS = 100
WINDOW_S = (-0.5, 1.5)
CHUNK_S = 2.0
MIN_RT_S, MAX_RT_S = 0.08, 2.0
# The trial fields the filter needs, by their IBL ALF names (every reader maps its own names onto these).
REQUIRED_TRIAL_FIELDS = ("stimOn_times", "choice", "feedback_times", "probabilityLeft", "firstMovement_times",
                         "feedbackType")
ALIGN_EVENTS = ("stimOn_times", "firstMovement_times", "feedback_times", "goCue_times")
PREPARE_JSON = "prepare.json"


class PrepareError(UserError):
  """Bad input to `prepare`: the one-line message names the file and the field."""


@dataclasses.dataclass
class Trace:
  """A behaviour time series: `times` [S] seconds (increasing), `values` [S]; `where` names it for messages."""
  times: np.ndarray
  values: np.ndarray
  where: str


@dataclasses.dataclass
class Recording:
  """What every reader returns: one session on its own clock (seconds).

  Attributes:
    eid, subject, lab, probe_name: identifiers written into every row.
    source: the file or folder read.
    spike_times: [S] float64, sorted.
    spike_units: [S] int32 index into the units.
    regions, depths, uuids: [U] per unit (acronyms, µm, unique ids).
    qc: [U] float QC label (IBL: fraction of metrics passed, 1 = good), NaN where unknown.
    trials: {IBL ALF field name: [K]} with at least `REQUIRED_TRIAL_FIELDS` (NaN where absent per trial);
      None when the source has no trials table.
    trials_where: the trials table's file, for messages.
    wheel: wheel position (rad) or None; motion_energy: whisker motion energy or None.
  """
  eid: str
  source: str
  spike_times: np.ndarray
  spike_units: np.ndarray
  regions: np.ndarray
  depths: np.ndarray
  uuids: np.ndarray
  qc: np.ndarray
  trials: dict[str, np.ndarray] | None
  trials_where: str
  wheel: Trace | None = None
  motion_energy: Trace | None = None
  subject: str = ""
  lab: str = ""
  probe_name: str = ""


@dataclasses.dataclass(frozen=True)
class Protocol:
  align: str = "stimOn_times"
  qc: float | None = 1.0
  seed: int = 0
  unaligned: bool = False


def warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- validation


def check_spike_train(times: np.ndarray, units: np.ndarray, n_units: int, times_where: str,
                      units_where: str) -> None:
  """One probe's (or unit's) spikes: same length, finite and sorted times, unit indices in 0..n_units-1."""
  if times.ndim != 1 or units.ndim != 1 or len(times) != len(units):
    raise PrepareError(f"{times_where}: {len(times)} spike times but {units_where} has {len(units)} entries")
  bad = np.flatnonzero(~np.isfinite(times))
  if bad.size:
    raise PrepareError(f"{times_where}: spike {bad[0]} has time {times[bad[0]]} (NaN or infinite)")
  bad = np.flatnonzero(np.diff(times) < 0)
  if bad.size:
    raise PrepareError(f"{times_where}: spike times are not sorted (spike {bad[0] + 1} at {times[bad[0] + 1]} s "
                       f"comes after {times[bad[0]]} s)")
  bad = np.flatnonzero((units < 0) | (units >= n_units))
  if bad.size:
    raise PrepareError(f"{units_where}: spike {bad[0]} belongs to cluster {units[bad[0]]}, but only "
                       f"{n_units} clusters are described (0..{n_units - 1})")


def trial_mask(trials: dict[str, np.ndarray], align: str, where: str) -> np.ndarray:
  """The protocol's trial filter (module docstring) as bool [K]."""
  fields = REQUIRED_TRIAL_FIELDS + ((align,) if align not in REQUIRED_TRIAL_FIELDS else ())
  missing = [f for f in fields if f not in trials]
  if missing:
    raise PrepareError(f"{where}: no trial field {missing[0]!r} (fields present: {', '.join(sorted(trials))})")
  arrays = {f: np.asarray(trials[f], np.float64) for f in fields}
  K = len(arrays["stimOn_times"])
  for f, a in arrays.items():
    if a.shape != (K,):
      raise PrepareError(f"{where}, field {f!r}: shape {a.shape}, but stimOn_times has {K} trials")
  keep = np.ones(K, bool)
  for a in arrays.values():
    keep &= ~np.isnan(a)
  rt = arrays["firstMovement_times"] - arrays["stimOn_times"]
  with np.errstate(invalid="ignore"):
    keep &= (arrays["choice"] != 0) & (rt >= MIN_RT_S) & (rt <= MAX_RT_S)
  if not keep.any():
    raise PrepareError(f"{where}: no trial left after filtering ({K} trials; kept iff {', '.join(fields)} are "
                       f"present, choice != 0 and {MIN_RT_S} s <= firstMovement_times - stimOn_times <= "
                       f"{MAX_RT_S} s)")
  return keep


# ------------------------------------------------------------------------------------------------- binning


def bin_edges(t0_K: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
  """[K, T+1] bin edges t0 + binsize·j."""
  return np.asarray(t0_K, np.float64)[:, None] + schema.BINSIZE_S * np.arange(n_bins + 1)


def bin_spikes(spike_times: np.ndarray, spike_units: np.ndarray, n_units: int, t0_K: np.ndarray,
               n_bins: int = N_BINS) -> np.ndarray:
  """Counts `uint16 [K, T, N]`: entry (k, j, n) counts unit n's spikes in [edge_kj, edge_k(j+1)).

  Spike times are sorted, so each window's spikes are one contiguous slice (windows may overlap). Counts are
  kept as uint16 (saturating at 65535, far above the 255 the schema keeps): a quarter of int64's memory.
  """
  edges_KxT1 = bin_edges(t0_K, n_bins)
  lo_K = np.searchsorted(spike_times, edges_KxT1[:, 0], side="left")
  hi_K = np.searchsorted(spike_times, edges_KxT1[:, -1], side="left")
  counts_KxTxN = np.zeros((len(t0_K), n_bins, n_units), np.uint16)
  for k, (lo, hi) in enumerate(zip(lo_K, hi_K)):
    if hi > lo:
      bin_S = np.searchsorted(edges_KxT1[k], spike_times[lo:hi], side="right") - 1
      counts_TN = np.bincount(bin_S * n_units + spike_units[lo:hi], minlength=n_bins * n_units)
      counts_KxTxN[k] = np.minimum(counts_TN, np.iinfo(np.uint16).max).reshape(n_bins, n_units)
  return counts_KxTxN


def wheel_speed(trace: Trace, t0_K: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
  """|Δposition| / binsize per bin, positions linearly interpolated at the edges: float32 [K, T]."""
  ok = np.isfinite(trace.values)
  pos_KxT1 = np.interp(bin_edges(t0_K, n_bins), trace.times[ok], trace.values[ok])
  return (np.abs(np.diff(pos_KxT1, axis=1)) / schema.BINSIZE_S).astype(np.float32)


def sample_right_edges(trace: Trace, t0_K: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
  """The trace at each bin's right edge (linear interpolation over the finite samples): float32 [K, T]."""
  ok = np.isfinite(trace.values)
  return np.interp(bin_edges(t0_K, n_bins)[:, 1:], trace.times[ok], trace.values[ok]).astype(np.float32)


def _check_trace(trace: Trace) -> Trace | None:
  times, values = np.asarray(trace.times, np.float64), np.asarray(trace.values, np.float64)
  if times.ndim != 1 or values.shape != times.shape:
    raise PrepareError(f"{trace.where}: {values.shape} values but {times.shape} timestamps")
  if not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0):
    raise PrepareError(f"{trace.where}: timestamps must be finite and increasing")
  if not np.isfinite(values).sum():
    warn(f"{trace.where}: no finite value; the behaviour is left out")
    return None
  return Trace(times, values, trace.where)


# -------------------------------------------------------------------------------------------- the protocol


def select_units(rec: Recording, qc: float | None) -> np.ndarray:
  """Indices of the units kept by the QC threshold."""
  if qc is None:
    return np.arange(len(rec.regions))
  if np.all(np.isnan(rec.qc)):
    raise PrepareError(f"{rec.source}: no QC label for the units; give --qc all to keep every unit")
  keep = np.flatnonzero(rec.qc >= qc)
  if not keep.size:
    raise PrepareError(f"{rec.source}: no unit has a QC label >= {qc} (of {len(rec.qc)}; labels "
                       f"{np.unique(rec.qc[np.isfinite(rec.qc)]).tolist()[:5]}...); lower --qc or give --qc all")
  return keep


def build_session(rec: Recording, protocol: Protocol) -> dict:
  """Applies the protocol: counts, behaviours, trial_idx and splits (the dict `write_session` takes)."""
  units = select_units(rec, protocol.qc)
  if len(units) == len(rec.regions):  # every unit kept: no copy of the spike arrays
    times_S, units_S = rec.spike_times, rec.spike_units
  else:
    remap_U = np.full(len(rec.regions), -1, np.int32)
    remap_U[units] = np.arange(len(units))
    new_S = remap_U[rec.spike_units]
    kept_S = new_S >= 0
    times_S, units_S = rec.spike_times[kept_S], new_S[kept_S]
    del new_S, kept_S
  behaviour = {}
  if protocol.unaligned:
    if not times_S.size:
      raise PrepareError(f"{rec.source}: the kept units have no spikes")
    n_chunks = int((times_S[-1] - times_S[0]) // CHUNK_S)
    if n_chunks < 1:
      raise PrepareError(f"{rec.source}: the recording lasts less than one {CHUNK_S} s chunk")
    t0_K = times_S[0] + CHUNK_S * np.arange(n_chunks)
    trial_idx = np.arange(n_chunks)
  else:
    if rec.trials is None:
      raise PrepareError(f"{rec.trials_where}: no trials table (give --unaligned for 2 s chunks instead)")
    keep = trial_mask(rec.trials, protocol.align, rec.trials_where)
    trial_idx = np.flatnonzero(keep)
    t0_K = np.asarray(rec.trials[protocol.align], np.float64)[trial_idx] + WINDOW_S[0]
    tr = {f: np.asarray(rec.trials[f], np.float64)[trial_idx] for f in REQUIRED_TRIAL_FIELDS}
    behaviour = {"choice": np.sign(tr["choice"]), "block": tr["probabilityLeft"],
                 "reward": (tr["feedbackType"] == 1).astype(np.float64)}
    for name, trace, fn in (("wheel-speed", rec.wheel, wheel_speed),
                            ("whisker-motion-energy", rec.motion_energy, sample_right_edges)):
      trace = _check_trace(trace) if trace is not None else None
      if trace is not None:
        behaviour[name] = fn(trace, t0_K)
      else:
        warn(f"{rec.source}: no {name} trace; the column is left out")
  counts_KxTxN = bin_spikes(times_S, units_S, len(units), t0_K)
  over = int((counts_KxTxN > 255).sum())
  if over:
    warn(f"{rec.source}: {over} bin counts above 255 clipped to 255 (max {counts_KxTxN.max()})")
  from ibl_jax.data.synthetic import _splits  # pylint: disable=g-import-not-at-top  (the same 70/10/20 rule)
  return {
      "eid": rec.eid, "subject": rec.subject, "lab": rec.lab, "probe_name": rec.probe_name,
      "counts_KxTxN": np.minimum(counts_KxTxN, 255).astype(np.uint8), "regions": np.asarray(rec.regions)[units],
      "depths": np.asarray(rec.depths, np.float64)[units], "uuids": np.asarray(rec.uuids)[units],
      "behaviour": behaviour, "trial_idx": trial_idx, "window_start": t0_K,
      "splits": _splits(np.random.default_rng(protocol.seed), len(t0_K)), "n_clipped": over,
  }


# ------------------------------------------------------------------------------------------------- writing


def features(behaviours):
  """`datasets.Features` of a prepared session: the schema's columns and those of the present behaviours."""
  from datasets import Features, List, Value  # pylint: disable=g-import-not-at-top
  ints, f32 = List(Value("int64")), List(Value("float32"))
  feats = {schema.SPIKES_DATA: ints, schema.SPIKES_INDICES: ints, schema.SPIKES_INDPTR: ints,
           schema.SPIKES_SHAPE: ints, schema.REGIONS: List(Value("string")), schema.DEPTHS: List(Value("float64")),
           schema.UUIDS: List(Value("string")), schema.EID: Value("string"), "subject": Value("string"),
           "lab": Value("string"), "probe_name": Value("string"), "binsize": Value("float64"),
           "interval_len": Value("float64"), "trial_idx": Value("int64"), "window_start": Value("float64")}
  for name in behaviours:
    feats[name] = f32 if name in schema.TRACE_BEHAVIOURS else Value("float64")
  return Features(feats)


def csr_columns(counts_KxTxN: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every trial's CSR (`schema.dense_to_csr`'s layout) at once, as (offsets [K+1], values) per list column."""
  K, T, N = counts_KxTxN.shape
  trial, t, n = np.nonzero(counts_KxTxN)  # row-major: sorted by trial, bin, neuron, as canonical CSR
  per_bin_KxT = np.bincount(trial * T + t, minlength=K * T).reshape(K, T)
  indptr_KxT1 = np.zeros((K, T + 1), np.int64)
  np.cumsum(per_bin_KxT, axis=1, out=indptr_KxT1[:, 1:])
  offsets = np.zeros(K + 1, np.int64)
  np.cumsum(indptr_KxT1[:, -1], out=offsets[1:])
  return {schema.SPIKES_DATA: (offsets, counts_KxTxN[trial, t, n].astype(np.int64)),
          schema.SPIKES_INDICES: (offsets, n.astype(np.int64)),
          schema.SPIKES_INDPTR: ((T + 1) * np.arange(K + 1, dtype=np.int64), indptr_KxT1.ravel())}


def to_dataset_dict(session: dict):
  """The session dict of `build_session` as a `datasets.DatasetDict` (one row per trial, CSR spikes).

  Columns are built as Arrow arrays directly (no Python object per count: `Dataset.from_dict` took 20 s
  of a 30 s one-hour session).
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  from datasets import Dataset, DatasetDict, DatasetInfo  # pylint: disable=g-import-not-at-top
  counts_KxTxN = session["counts_KxTxN"]
  _, T, N = counts_KxTxN.shape
  feats = features(session["behaviour"])
  out = {}
  for name, idx in session["splits"].items():
    K = len(idx)
    if not K:
      continue  # too few trials for this split (`load_session` reads the splits present)
    lists = lambda offsets, values, typ: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                                  pa.array(values, typ))
    every_row = lambda values, typ: lists(len(values) * np.arange(K + 1), np.tile(values, K), typ)
    columns = {key: lists(o, v, pa.int64()) for key, (o, v) in csr_columns(counts_KxTxN[idx]).items()}
    columns.update({
        schema.SPIKES_SHAPE: every_row(np.array([T, N], np.int64), pa.int64()),
        schema.REGIONS: every_row(np.asarray(session["regions"], str), pa.string()),
        schema.DEPTHS: every_row(np.asarray(session["depths"], np.float64), pa.float64()),
        schema.UUIDS: every_row(np.asarray(session["uuids"], str), pa.string()),
        schema.EID: pa.array([session["eid"]] * K, pa.string()),
        "subject": pa.array([session["subject"]] * K, pa.string()),
        "lab": pa.array([session["lab"]] * K, pa.string()),
        "probe_name": pa.array([session["probe_name"]] * K, pa.string()),
        "binsize": pa.array(np.full(K, schema.BINSIZE_S)),
        "interval_len": pa.array(np.full(K, N_BINS * schema.BINSIZE_S)),
        "trial_idx": pa.array(np.asarray(session["trial_idx"][idx], np.int64)),
        "window_start": pa.array(np.asarray(session["window_start"][idx], np.float64)),
    })
    for key, values in session["behaviour"].items():
      v = values[idx]
      columns[key] = (lists(T * np.arange(K + 1), v.astype(np.float32).ravel(), pa.float32()) if v.ndim == 2
                      else pa.array(v.astype(np.float64)))
    table = pa.table({key: columns[key] for key in feats}, schema=feats.arrow_schema)
    out[name] = Dataset(table, info=DatasetInfo(features=feats))
  return DatasetDict(out)


def write_session(session: dict, out: str | Path, provenance: dict, *, overwrite: bool = False) -> Path:
  """Writes the session to `out` through a temporary sibling folder renamed at the end."""
  import datasets  # pylint: disable=g-import-not-at-top
  out = Path(out)
  if out.exists() and not overwrite:
    raise PrepareError(f"{out}: already exists; remove it or give --overwrite")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    datasets.disable_progress_bars()
    to_dataset_dict(session).save_to_disk(str(tmp / "session"))
    counts = session["counts_KxTxN"]
    info = {**provenance, "eid": session["eid"], "n_trials": int(counts.shape[0]), "n_units": int(counts.shape[2]),
            "n_bins": int(counts.shape[1]), "binsize": schema.BINSIZE_S, "n_clipped": session["n_clipped"],
            "splits": {k: int(len(v)) for k, v in session["splits"].items()},
            "behaviours": sorted(session["behaviour"])}
    (tmp / "session" / PREPARE_JSON).write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
      shutil.rmtree(out)
    os.rename(tmp / "session", out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def prepare(rec: Recording, out: str | Path, protocol: Protocol, *, provenance: dict | None = None,
            overwrite: bool = False) -> dict:
  """Protocol + writer; returns the `prepare.json` summary."""
  session = build_session(rec, protocol)
  prov = {"source": rec.source, **(provenance or {}), **dataclasses.asdict(protocol)}
  path = write_session(session, out, prov, overwrite=overwrite)
  return json.loads((path / PREPARE_JSON).read_text())
