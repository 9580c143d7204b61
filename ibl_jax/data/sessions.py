"""Load IBL processed sessions (docs/design.md §3) into dense in-memory arrays, and gather them into a corpus.

A session is read once: its CSR spike columns are decoded per split into `uint8 [K, T, N]`, neuron metadata
is taken from the first row, behaviours become float arrays. Every error is a `SessionError` whose one-line
message names the session, split and column.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ibl_jax.data import cache, schema
from ibl_jax.data.schema import SessionError
from ibl_jax.errors import UserError


@dataclasses.dataclass
class Split:
  """One split of a session: `spikes_KxTxN` uint8 counts, behaviours `{name: [K] or [K, T]}`."""
  spikes: np.ndarray
  behaviour: dict[str, np.ndarray]
  true_rates: np.ndarray | None = None  # float32 [K, T, N], synthetic sessions only
  trial_ids: np.ndarray | None = None  # row numbers in the original split (after a trial filter)
  # Per-neuron mean count per bin [N] (float64). Stored in the array cache, so that a start-up over many sessions
  # (the readout bias) does not read every trial of every session; computed on first use otherwise.
  mean_counts_N: np.ndarray | None = None

  def mean_counts(self) -> np.ndarray:
    if self.mean_counts_N is None:
      self.mean_counts_N = self.spikes.mean(axis=(0, 1), dtype=np.float64)
    return self.mean_counts_N


@dataclasses.dataclass
class Session:
  eid: str
  source: str  # the directory or hub id it was read from
  splits: dict[str, Split]
  regions: np.ndarray  # [N] str acronyms
  depths: np.ndarray  # [N] float µm
  uuids: np.ndarray  # [N] str
  region_ids: np.ndarray | None = None  # [N] int32, set by the corpus vocabulary
  session_idx: int = 0

  @property
  def num_neurons(self) -> int:
    return len(self.regions)

  @property
  def num_bins(self) -> int:
    return next(iter(self.splits.values())).spikes.shape[1]


def in_memory(session: Session) -> Session:
  """The session with its splits' counts and true rates read into private memory (`cache.in_memory`), for
  evaluating sessions one at a time over a large corpus: each copy goes with its session."""
  splits = {name: dataclasses.replace(split, spikes=cache.in_memory(split.spikes),
                                      true_rates=None if split.true_rates is None else cache.in_memory(split.true_rates))
            for name, split in session.splits.items()}
  return dataclasses.replace(session, splits=splits)


def load_raw(source: str, *, cache_dir: str | None = None):
  """Opens a `DatasetDict` from a `save_to_disk` directory or a hub id (offline, a hub id fails in one line)."""
  import datasets  # pylint: disable=g-import-not-at-top  (slow import; the CLI's --help should not pay it)
  datasets.disable_progress_bars()
  path = Path(source).expanduser()
  if path.exists():
    try:
      if (path / "dataset_dict.json").exists():  # split by split: `datasets` cannot reload an empty split
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {name: _load_split(path / name) for name in names}
      return datasets.load_from_disk(str(path))
    except Exception as e:  # pylint: disable=broad-except
      raise SessionError(f"session {source}: not a dataset written by DatasetDict.save_to_disk "
                         f"({type(e).__name__}: {_first_line(e)})") from None
  if source.count("/") != 1 or source.startswith((".", "/", "~")) or path.parent.is_dir():
    # `data/x` with a local `data/` is a missing directory, not a hub id: fail now, not after hub retries.
    raise SessionError(f"session {source}: no such directory (and not a hub id of the form owner/name)")
  try:
    return datasets.load_dataset(source, cache_dir=cache_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise SessionError(f"session {source}: no such directory, and loading it as a hub id failed "
                       f"({type(e).__name__}: {_first_line(e)}); offline, give a local directory written by "
                       f"DatasetDict.save_to_disk") from None


def _load_split(path: Path):
  """One saved split, or None when it holds no rows (saved without any data file)."""
  import datasets  # pylint: disable=g-import-not-at-top
  if not json.loads((path / "state.json").read_text()).get("_data_files"):
    return None
  return datasets.Dataset.load_from_disk(str(path))


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]


def load_session(source: str, *, cache_dir: str | None = None, trial_filter: str | dict | None = None,
                 regions: Sequence[str] | None = None, neuron_order: str = "none",
                 with_true_rates: bool = False, array_cache: str | None = None) -> Session:
  """Reads one session.

  Args:
    source: a `save_to_disk` directory or a hub id.
    trial_filter: `{split: mask [K]}` (bool or integer 0/1) or a `.npz`/`.npy` file holding it, or an `.npy` of
      one flat mask over all trials in train, val, test order (the original's `data/trials_mask/<eid>.npy`);
      `{eid}` in a path is replaced.
    regions: keep only neurons in these acronyms.
    neuron_order: "none", "depth" (by probe depth) or "region" (by acronym, then depth).
    with_true_rates: also read the synthetic `true_rates` column when present.
    array_cache: where decoded arrays are cached (`cache.session_dir`; default beside the data, "off" decodes
      into memory every time). Cached arrays are read-only memory maps.
  """
  entry = cache.session_dir(source, array_cache, cache_dir)
  session = (_decode(source, cache_dir=cache_dir, with_true_rates=with_true_rates) if entry is None else
             _cached_session(source, entry, cache_dir=cache_dir, with_true_rates=with_true_rates))
  return _select(session, trial_filter=trial_filter, regions=regions, neuron_order=neuron_order)


def _decode(source: str, *, cache_dir: str | None, with_true_rates: bool, raw=None) -> Session:
  """Decodes every split of a session from its Arrow columns into memory (also the cache's build step)."""
  raw = load_raw(source, cache_dir=cache_dir) if raw is None else raw
  names = [s for s in schema.SPLITS if s in raw] or list(raw.keys())
  if not names:
    raise SessionError(f"session {source}: the dataset has no splits")
  first = next((raw[n] for n in names if raw[n] is not None and len(raw[n])), None)
  eid = str(first[0][schema.EID]) if first is not None and schema.EID in first.column_names else Path(source).name
  splits, meta = {}, None
  for name in names:
    where = f"session {eid}, split {name!r}"
    ds = raw[name]
    if ds is None or len(ds) == 0:
      raise SessionError(f"{where}: the split has no trials")
    if getattr(ds, "_indices", None) is not None:
      ds = ds.flatten_indices()
    missing = [c for c in schema.SPIKE_COLUMNS + schema.NEURON_COLUMNS if c not in ds.column_names]
    if missing:
      raise SessionError(f"{where}, column {missing[0]!r}: missing (columns present: "
                         f"{', '.join(sorted(ds.column_names))})")
    table = ds.data.table
    shapes = schema.Ragged.from_arrow(table.column(schema.SPIKES_SHAPE))
    if np.any(shapes.lengths != 2):
      raise SessionError(f"{where}, column {schema.SPIKES_SHAPE!r}: expected [T, N] in every row")
    shape_Kx2 = shapes.values.reshape(-1, 2).astype(np.int64)
    if np.any(shape_Kx2 != shape_Kx2[0]):
      k = int(np.flatnonzero(np.any(shape_Kx2 != shape_Kx2[0], axis=1))[0])
      raise SessionError(f"{where}, column {schema.SPIKES_SHAPE!r}: trial {k} has shape {shape_Kx2[k].tolist()}, "
                         f"trial 0 has {shape_Kx2[0].tolist()}")
    T, N = (int(v) for v in shape_Kx2[0])
    row0 = ds[0]
    for col in schema.NEURON_COLUMNS:
      if len(row0[col]) != N:
        raise SessionError(f"{where}, column {col!r}: length {len(row0[col])}, but the spikes have N = {N} neurons")
    if meta is None:
      meta = (np.asarray(row0[schema.REGIONS], dtype=str), np.asarray(row0[schema.DEPTHS], np.float32),
              np.asarray(row0[schema.UUIDS], dtype=str))
      _check_finite(meta[1][None], where, schema.DEPTHS, what="neuron")
    elif len(meta[0]) != N:
      raise SessionError(f"{where}, column {schema.SPIKES_SHAPE!r}: N = {N}, but split {names[0]!r} has "
                         f"N = {len(meta[0])}")
    spikes = schema.csr_to_dense(*(schema.Ragged.from_arrow(table.column(c)) for c in schema.SPIKE_COLUMNS[:3]),
                                 T, N, where=where)
    splits[name] = Split(spikes=spikes, behaviour=_behaviours(table, ds.column_names, len(ds), T, where),
                         true_rates=_true_rates(table, ds.column_names, len(ds), T, N, where)
                         if with_true_rates else None,
                         trial_ids=np.arange(len(ds)))
  return Session(eid=eid, source=str(source), splits=splits, regions=meta[0], depths=meta[1], uuids=meta[2])


def _select(session: Session, *, trial_filter, regions, neuron_order) -> Session:
  """Trial filter, region selection and neuron order; the selected arrays are copies in memory."""
  eid = session.eid
  if trial_filter is not None:
    _filter_trials(session, trial_filter)
  if regions:
    keep = np.isin(session.regions, list(regions))
    if not keep.any():
      raise SessionError(f"session {eid}, column {schema.REGIONS!r}: none of the regions {list(regions)} recorded "
                         f"(present: {sorted(set(session.regions.tolist()))})")
    _select_neurons(session, np.flatnonzero(keep))
  if neuron_order != "none":
    _select_neurons(session, neuron_order_index(session.regions, session.depths, neuron_order))
  return session


def _cached_session(source: str, entry: Path, *, cache_dir: str | None, with_true_rates: bool) -> Session:
  """The session from its array cache (built on first use): counts, behaviours and true rates memory-mapped.

  Two entries: `base` (counts, behaviours, neuron metadata) and `true_rates` (built only when asked; it records
  their absence for real sessions), so a run without the oracle never decodes or stores the float rates.
  """
  path, raw = Path(source).expanduser(), None
  if path.exists():
    fp = cache.fingerprint(path.resolve())
  else:  # a hub id: its Arrow files in the hub cache are the source
    raw = load_raw(source, cache_dir=cache_dir)
    fp = cache.files_fingerprint([f["filename"] for ds in raw.values() if ds is not None for f in ds.cache_files])
  decoded = {}

  def decode() -> Session:  # at most once per open, shared by both entries
    if "session" not in decoded:
      decoded["session"] = _decode(source, cache_dir=cache_dir, with_true_rates=with_true_rates, raw=raw)
    return decoded["session"]

  key = {"source": fp}
  entries = ["base"] + (["true_rates"] if with_true_rates else [])
  if all(cache.current(entry / name, key) for name in entries):
    return _open_cached(source, entry, key, decode, with_true_rates)
  with cache.lock(entry):  # one process builds both entries from one decode; the others wait, then map them
    return _open_cached(source, entry, key, decode, with_true_rates)


def _open_cached(source: str, entry: Path, key: dict, decode, with_true_rates: bool) -> Session:
  arrays, meta = cache.cached(entry / "base", key, lambda: _session_arrays(decode()), what=f"session {source}")
  session = Session(eid=meta["eid"], source=str(source), regions=np.array(arrays["regions"]),
                    depths=np.array(arrays["depths"]), uuids=np.array(arrays["uuids"]), splits={
                        name: Split(spikes=arrays[f"{name}.spikes"], trial_ids=np.arange(K),
                                    mean_counts_N=np.array(arrays[f"{name}.mean_counts"]),
                                    behaviour={b: arrays[f"{name}.{b}"] for b in meta["behaviours"][name]})
                        for name, K in meta["trials"].items()})
  if with_true_rates:
    rates, _ = cache.cached(entry / "true_rates", key, lambda: ({
        f"{name}.true_rates": split.true_rates for name, split in decode().splits.items()
        if split.true_rates is not None}, {}), what=f"session {source} (true rates)")
    for name, split in session.splits.items():
      split.true_rates = rates.get(f"{name}.true_rates")
  return session


def _session_arrays(session: Session) -> tuple[dict[str, np.ndarray], dict]:
  """A decoded session as flat named arrays and JSON meta: what a `base` cache entry holds."""
  arrays = {"regions": session.regions, "depths": session.depths, "uuids": session.uuids}
  for name, split in session.splits.items():
    arrays[f"{name}.spikes"] = split.spikes
    arrays[f"{name}.mean_counts"] = split.mean_counts()
    arrays.update({f"{name}.{b}": v for b, v in split.behaviour.items()})
  meta = {"eid": session.eid, "trials": {name: int(split.spikes.shape[0]) for name, split in session.splits.items()},
          "behaviours": {name: list(split.behaviour) for name, split in session.splits.items()}}
  return arrays, meta


def _behaviours(table, columns, K: int, T: int, where: str) -> dict[str, np.ndarray]:
  out = {}
  for name in schema.TRIAL_BEHAVIOURS:
    if name in columns:
      out[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
      _check_finite(out[name], where, name)
  for name in schema.TRACE_BEHAVIOURS:
    if name in columns:
      trace = schema.Ragged.from_arrow(table.column(name))
      if np.any(trace.lengths != T):
        k = int(np.flatnonzero(trace.lengths != T)[0])
        raise SessionError(f"{where}, column {name!r}: trial {k} has length {trace.lengths[k]}, expected T = {T}")
      out[name] = trace.values.astype(np.float32).reshape(K, T)
      _check_finite(out[name], where, name)
  return out


def _check_finite(values_Kx: np.ndarray, where: str, column: str, *, what: str = "trial") -> None:
  """NaN or inf in input data would reach the loss or a decoder silently: one line naming where."""
  bad = ~np.isfinite(values_Kx.reshape(len(values_Kx), -1))
  if bad.any():
    row, col = (int(i[0]) for i in np.nonzero(bad))
    index = f"{what} {col}" if what == "neuron" else f"trial {row}"
    raise SessionError(f"{where}, column {column!r}: {index} holds {values_Kx.reshape(len(values_Kx), -1)[row, col]}"
                       f" (values must be finite; drop such trials with data.trial_filter)")


def _true_rates(table, columns, K: int, T: int, N: int, where: str) -> np.ndarray | None:
  if schema.TRUE_RATES not in columns:
    return None
  rows = table.column(schema.TRUE_RATES).combine_chunks().flatten()  # [K*T] lists of N
  flat = schema.Ragged.from_arrow(rows)
  if flat.values.size != K * T * N:
    raise SessionError(f"{where}, column {schema.TRUE_RATES!r}: expected [T={T}][N={N}] per trial")
  rates_KxTxN = flat.values.astype(np.float32).reshape(K, T, N)
  _check_finite(rates_KxTxN, where, schema.TRUE_RATES)
  return rates_KxTxN


def neuron_order_index(regions: np.ndarray, depths: np.ndarray, order: str) -> np.ndarray:
  """Neuron permutation: by depth, or by region acronym then depth (stable)."""
  if order == "depth":
    return np.argsort(depths, kind="stable")
  if order == "region":
    return np.lexsort((depths, regions))
  raise UserError(f"neuron_order must be none, depth or region, not {order!r}")


def _select_neurons(session: Session, index: np.ndarray) -> None:
  session.regions, session.depths, session.uuids = (a[index] for a in (session.regions, session.depths,
                                                                         session.uuids))
  for split in session.splits.values():
    split.spikes = np.ascontiguousarray(split.spikes[:, :, index])
    split.mean_counts_N = None if split.mean_counts_N is None else split.mean_counts_N[index]
    if split.true_rates is not None:
      split.true_rates = np.ascontiguousarray(split.true_rates[:, :, index])


def _load_filter(spec: str | dict, eid: str) -> dict[str, np.ndarray] | np.ndarray:
  if isinstance(spec, dict):
    return spec
  path = Path(str(spec).replace("{eid}", eid))
  if not path.exists():
    raise SessionError(f"session {eid}: trial filter file {path} does not exist")
  if path.suffix == ".npz":
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  loaded = np.load(path, allow_pickle=True)
  if loaded.dtype == object and loaded.shape == ():
    return dict(loaded.item())
  if loaded.ndim == 1 and loaded.dtype != object:  # the original's data/trials_mask/<eid>.npy: one flat mask
    return loaded
  raise SessionError(f"session {eid}: trial filter {path} must hold {{split: mask}} (an .npz with one array per "
                     f"split, or an .npy of a dict) or one flat mask over all trials (train, val, test order)")


def _as_mask(keep, K: int, where: str) -> np.ndarray:
  """A bool [K] from a bool or integer 0/1 array (the original's trial masks are integer)."""
  keep = np.asarray(keep)
  if keep.shape != (K,) or not (keep.dtype == bool or keep.dtype.kind in "iu"):
    raise SessionError(f"{where}: the trial filter must be a bool or 0/1 integer array of length {K}, "
                       f"got {keep.dtype} {keep.shape}")
  if keep.dtype != bool:
    bad = np.flatnonzero((keep != 0) & (keep != 1))
    if bad.size:
      raise SessionError(f"{where}: the trial filter has value {keep[bad[0]]} at trial {bad[0]}; expected 0 or 1")
  return keep.astype(bool)


def filter_trials(session: Session, spec: str | dict) -> Session:
  """A copy of `session` with only the trials `spec` keeps (the formats of `load_session`'s trial_filter); the
  arrays of the original are not modified."""
  copy = dataclasses.replace(session, splits={name: dataclasses.replace(split) for name, split in
                                              session.splits.items()})
  for split in copy.splits.values():
    if split.trial_ids is None:
      split.trial_ids = np.arange(split.spikes.shape[0])
  _filter_trials(copy, spec)
  return copy


def _filter_trials(session: Session, spec: str | dict) -> None:
  masks = _load_filter(spec, session.eid)
  if not isinstance(masks, dict):  # one flat mask: the splits' trials one after another
    names = [n for n in schema.SPLITS if n in session.splits]
    sizes = [session.splits[n].spikes.shape[0] for n in names]
    flat = _as_mask(masks, sum(sizes), f"session {session.eid}, splits {'+'.join(names)}")
    masks = dict(zip(names, np.split(flat, np.cumsum(sizes)[:-1])))
  for name, keep in masks.items():
    if name not in session.splits:
      raise SessionError(f"session {session.eid}, split {name!r}: in the trial filter but not in the session")
    split = session.splits[name]
    keep = _as_mask(keep, split.spikes.shape[0], f"session {session.eid}, split {name!r}")
    if not keep.any():
      raise SessionError(f"session {session.eid}, split {name!r}: the trial filter keeps no trials")
    split.spikes = split.spikes[keep]
    split.behaviour = {k: v[keep] for k, v in split.behaviour.items()}
    split.true_rates = None if split.true_rates is None else split.true_rates[keep]
    split.trial_ids = split.trial_ids[keep]
    split.mean_counts_N = None  # recomputed from the kept trials (in memory) when asked


# ---------------------------------------------------------------------------------------------- the corpus


@dataclasses.dataclass
class Corpus:
  """Several sessions with one region vocabulary and one number of time bins."""
  sessions: list[Session]
  region_vocab: list[str]

  @property
  def num_bins(self) -> int:
    return self.sessions[0].num_bins

  @property
  def n_max(self) -> int:
    return max(s.num_neurons for s in self.sessions)

  @property
  def eids(self) -> list[str]:
    return [s.eid for s in self.sessions]

  def session(self, eid: str) -> Session:
    for s in self.sessions:
      if s.eid == eid:
        return s
    raise KeyError(f"session {eid} is not in this corpus ({', '.join(self.eids)})")


def resolve_sources(spec: str | Sequence[str]) -> list[str]:
  """Session sources from a list, comma-separated text, an eids file, or a directory of sessions.

  In an eids file (one per line, `#` comments allowed) a line naming a directory beside the file is that
  directory; anything else is a hub id.
  """
  if not isinstance(spec, str):
    return [str(s) for s in spec]
  if "," in spec:
    return [s.strip() for s in spec.split(",") if s.strip()]
  path = Path(spec).expanduser()
  if path.is_file():
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    out = [str(path.parent / ln) if (path.parent / ln).is_dir() else ln for ln in lines if ln]
    if not out:
      raise SessionError(f"sessions file {path}: no sessions listed")
    return out
  if path.is_dir() and not (path / "dataset_dict.json").exists():
    subdirs = sorted(p for p in path.iterdir() if (p / "dataset_dict.json").exists())
    if not subdirs:
      raise SessionError(f"sessions directory {path}: holds no dataset written by DatasetDict.save_to_disk")
    return [str(p) for p in subdirs]
  return [spec]


def load_corpus(spec: str | Sequence[str], *, region_vocab: Sequence[str] | None = None,
                progress: bool = False, **session_kwargs) -> Corpus:
  """Loads every session of `spec` (see `resolve_sources`) and assigns region ids and session indices.

  `region_vocab` (e.g. saved with a pretraining run) keeps existing ids stable; new acronyms are appended.
  """
  sources = resolve_sources(spec)
  iterator: Iterable[str] = sources
  if progress and len(sources) > 1:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    iterator = tqdm(sources, desc="loading sessions", unit="session")
  sessions = [load_session(s, **session_kwargs) for s in iterator]
  T0 = sessions[0].num_bins
  for s in sessions[1:]:
    if s.num_bins != T0:
      raise SessionError(f"session {s.eid}, column {schema.SPIKES_SHAPE!r}: T = {s.num_bins} bins, but session "
                         f"{sessions[0].eid} has T = {T0}; one corpus needs one T")
  seen = {}
  for s in sessions:
    if s.eid in seen:
      raise SessionError(f"session {s.eid}: listed twice ({seen[s.eid]} and {s.source})")
    seen[s.eid] = s.source
  vocab = list(region_vocab or [])
  for acronym in sorted({a for s in sessions for a in s.regions.tolist()}):
    if acronym not in vocab:
      vocab.append(acronym)
  index = {a: i for i, a in enumerate(vocab)}
  for i, s in enumerate(sessions):
    s.session_idx = i
    s.region_ids = np.array([index[a] for a in s.regions.tolist()], np.int32)
  return Corpus(sessions=sessions, region_vocab=vocab)


def save_vocab(corpus: Corpus, path: str | Path) -> None:
  """Writes what a run needs to map sessions and regions back to ids: eids in session order, region vocab, and
  each session's neuron region ids (models that embed regions are built from them)."""
  from ibl_jax import rundir  # pylint: disable=g-import-not-at-top
  rundir.atomic_write_text(path, json.dumps({"eids": corpus.eids, "sources": [s.source for s in corpus.sessions],
                                             "num_neurons": [s.num_neurons for s in corpus.sessions],
                                             "region_vocab": corpus.region_vocab,
                                             "neuron_regions": [s.region_ids.tolist() for s in corpus.sessions]},
                                            indent=1))
