"""Reader: an IBL session folder as ONE caches it (`<lab>/Subjects/<subject>/<date>/<number>/`) → `Recording`.

Read with ONE's own ALF loaders (`one.alf.io`): the trials object (`alf/_ibl_trials.table.pqt` or per-attribute
`.npy`), every spike-sorting collection `alf/<probe>/[<sorter>/]` holding `spikes.times` (one per probe: with
several sorters, `--sorter` picks one), wheel (`alf/_ibl_wheel.*`) and whisker motion energy
(`alf/_ibl_leftCamera.ROIMotionEnergy` + `.times`, the right camera when the left is missing). Probes are
merged into one session (units in probe order, spikes re-sorted by time). Regions: each cluster's channel's
Allen id (`channels.brainLocationIds_ccf_2017`) through `iblatlas.regions.BrainRegions` — Allen acronyms (as
the original stores them), or the Beryl or Cosmos parcellation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibl_jax.data.prepare import PrepareError, Recording, Trace, check_spike_train, warn

REGION_MAPPINGS = {"allen": "Allen", "beryl": "Beryl", "cosmos": "Cosmos"}


def _alf():
  try:
    from one.alf import io as alfio  # pylint: disable=g-import-not-at-top
    from one.alf.exceptions import ALFObjectNotFound  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise PrepareError("reading ALF needs ONE: pip install one-api") from None
  return alfio, ALFObjectNotFound


def _load(folder: Path, obj: str, attributes: list[str], session: Path, **parts):
  """`one.alf.io.load_object` of some attributes; a missing object or attribute is a one-line error.

  An attribute with a timescale (`brainLocationIds_ccf_2017`) is filtered by its attribute part; give the
  timescale in `parts`.
  """
  alfio, not_found = _alf()
  rel = folder.relative_to(session)
  try:
    loaded = alfio.load_object(folder, obj, attribute=[a.split("_")[0] for a in attributes], **parts)
  except not_found:
    raise PrepareError(f"{rel}/: no ALF object {obj!r} (expected {obj}.{attributes[0]}.* there)") from None
  missing = [a for a in attributes if a not in loaded]
  if missing:
    raise PrepareError(f"{rel}/{obj}.{missing[0]}: missing")
  return loaded


def spike_collections(session: Path, sorter: str | None = None) -> list[Path]:
  """Folders under alf/ holding spikes.times, one per probe (the probe folder's own, or its `sorter`'s)."""
  alfio, _ = _alf()
  folders = sorted({(session / d).parent for d in alfio.iter_datasets(session)
                    if Path(d).name.startswith("spikes.times") and Path(d).parts[0] == "alf"
                    and len(Path(d).parts) > 2})
  by_probe: dict[str, list[Path]] = {}
  for f in folders:
    by_probe.setdefault(f.relative_to(session / "alf").parts[0], []).append(f)
  out = []
  for probe, options in sorted(by_probe.items()):
    if sorter is not None:
      options = [f for f in options if f.name == sorter]
    elif len(options) > 1:
      raise PrepareError(f"alf/{probe}/: spikes from {len(options)} spike sorters "
                         f"({', '.join(str(f.relative_to(session)) for f in options)}); choose one with --sorter")
    out.extend(options)
  if not out:
    raise PrepareError(f"{session}/alf: no spikes.times.npy in any alf/<probe>/[<sorter>/] folder"
                       + (f" for sorter {sorter!r}" if sorter else ""))
  return out


def _regions(channel_ids: np.ndarray, mapping: str, where: str) -> np.ndarray:
  from iblatlas.regions import BrainRegions  # pylint: disable=g-import-not-at-top
  br = BrainRegions()  # the Allen table ships with iblatlas: no download
  unknown = ~np.isin(channel_ids, br.id)
  if unknown.any():
    raise PrepareError(f"{where}: Allen id {channel_ids[unknown][0]} is not in the atlas (cluster location unknown)")
  return np.asarray(br.id2acronym(channel_ids, mapping=REGION_MAPPINGS[mapping]), dtype=str)


def _probe(session: Path, folder: Path, regions: str):
  """One probe's spikes and clusters (validated), in that probe's cluster numbering."""
  rel = folder.relative_to(session)
  spikes = _load(folder, "spikes", ["times", "clusters"], session)
  clusters = _load(folder, "clusters", ["channels", "depths"], session)
  extra = _alfio_optional(folder, "clusters", ["uuids", "metrics"])
  locations = _load(folder, "channels", ["brainLocationIds_ccf_2017"], session, timescale="ccf_2017")
  times = np.asarray(spikes["times"], np.float64).ravel()
  units = np.asarray(spikes["clusters"]).ravel()
  channels = np.asarray(clusters["channels"]).ravel()
  n = len(channels)
  check_spike_train(times, units, n, f"{rel}/spikes.times", f"{rel}/spikes.clusters")
  units = units.astype(np.int32)  # checked: 0 <= cluster < n
  depths = np.asarray(clusters["depths"], np.float64).ravel()
  if len(depths) != n:
    raise PrepareError(f"{rel}/clusters.depths: {len(depths)} values, but clusters.channels has {n} clusters")
  ids = np.asarray(locations["brainLocationIds_ccf_2017"]).ravel()
  bad = np.flatnonzero(~np.isfinite(channels.astype(np.float64)) | (channels < 0) | (channels >= len(ids)))
  if bad.size:
    raise PrepareError(f"{rel}/clusters.channels: cluster {bad[0]} has channel {channels[bad[0]]}, but "
                       f"channels.brainLocationIds_ccf_2017 has {len(ids)} channels")
  region = _regions(ids.astype(np.int64)[channels.astype(np.int64)], regions,
                    f"{rel}/channels.brainLocationIds_ccf_2017")
  uuids = extra.get("uuids")
  if uuids is None:
    uuids = np.array([f"{rel}/{i}" for i in range(n)])
    warn(f"{rel}/clusters.uuids.csv: missing; units are named {rel}/<cluster>")
  else:
    uuids = np.asarray(getattr(uuids, "to_numpy", lambda: uuids)(), dtype=str).ravel()
    if len(uuids) != n:
      raise PrepareError(f"{rel}/clusters.uuids: {len(uuids)} values, but clusters.channels has {n} clusters")
  metrics = extra.get("metrics")
  if metrics is None or "label" not in getattr(metrics, "columns", ()):
    qc = np.full(n, np.nan)
  else:
    qc = np.full(n, np.nan)
    ids_m = metrics["cluster_id"].to_numpy() if "cluster_id" in metrics.columns else np.arange(len(metrics))
    ok = (ids_m >= 0) & (ids_m < n)
    qc[ids_m[ok].astype(np.int64)] = metrics["label"].to_numpy(np.float64)[ok]
  return times, units, region, depths, uuids, qc


def _alfio_optional(folder: Path, obj: str, attributes: list[str]) -> dict:
  alfio, not_found = _alf()
  out = {}
  for a in attributes:
    try:
      out.update(alfio.load_object(folder, obj, attribute=a))
    except not_found:
      pass
  return out


def _trials(session: Path):
  alfio, not_found = _alf()
  try:
    trials = alfio.load_object(session / "alf", "trials")
  except not_found:
    return None
  out = {}
  for key, value in trials.items():
    value = np.asarray(value)
    if value.ndim == 1 and value.dtype.kind in "biuf":
      out[key] = value.astype(np.float64)
  return out


def _trace(session: Path, obj: str, values_attr: str, times_attr: str) -> Trace | None:
  loaded = _alfio_optional(session / "alf", obj, [values_attr, times_attr])
  if values_attr not in loaded or times_attr not in loaded:
    return None
  return Trace(np.asarray(loaded[times_attr], np.float64).ravel(), np.asarray(loaded[values_attr],
                                                                              np.float64).ravel(),
               f"alf/{obj}.{values_attr}")


def merge_sorted(a_S, a_units_S, b_S, b_units_S):
  """Two time-sorted spike trains as one (ties: `a` first), without a full argsort's index array."""
  pos_b = np.searchsorted(a_S, b_S, side="right") + np.arange(len(b_S))  # b's places in the merged train
  from_a = np.ones(len(a_S) + len(b_S), bool)
  from_a[pos_b] = False
  times, units = np.empty(len(from_a), a_S.dtype), np.empty(len(from_a), a_units_S.dtype)
  times[pos_b], units[pos_b] = b_S, b_units_S
  times[from_a], units[from_a] = a_S, a_units_S
  return times, units


def read_alf(session_dir: str | Path, *, regions: str = "allen", sorter: str | None = None,
             eid: str | None = None) -> Recording:
  """Reads an IBL ALF session folder (see the module docstring)."""
  if regions not in REGION_MAPPINGS:
    raise PrepareError(f"--regions must be one of {', '.join(REGION_MAPPINGS)}, not {regions!r}")
  session = Path(session_dir).expanduser().resolve()
  if not (session / "alf").is_dir():
    raise PrepareError(f"{session}: no alf/ folder (give a session folder <lab>/Subjects/<subject>/<date>/<number>)")
  probes = spike_collections(session, sorter)
  parts = [_probe(session, f, regions) for f in probes]
  offsets = np.cumsum([0] + [len(p[2]) for p in parts])
  for p, o in zip(parts, offsets):
    np.add(p[1], np.int32(o), out=p[1])  # cluster numbers of the merged session
  times, units = parts[0][0], parts[0][1]
  for p in parts[1:]:
    times, units = merge_sorted(times, units, p[0], p[1])
  from one.alf import path as alfpath  # pylint: disable=g-import-not-at-top
  info = alfpath.session_path_parts(session, as_dict=True, assert_valid=False)
  subject, lab = info.get("subject") or "", info.get("lab") or ""
  default_eid = "_".join(str(info[k]) for k in ("subject", "date", "number") if info.get(k)) or session.name
  wheel = _trace(session, "wheel", "position", "timestamps")
  me = _trace(session, "leftCamera", "ROIMotionEnergy", "times") or _trace(session, "rightCamera",
                                                                          "ROIMotionEnergy", "times")
  return Recording(
      eid=eid or default_eid, source=str(session), spike_times=times, spike_units=units,
      regions=np.concatenate([p[2] for p in parts]), depths=np.concatenate([p[3] for p in parts]),
      uuids=np.concatenate([p[4] for p in parts]), qc=np.concatenate([p[5] for p in parts]),
      trials=_trials(session), trials_where="alf/_ibl_trials.*", wheel=wheel, motion_energy=me,
      subject=subject, lab=lab, probe_name=",".join(str(f.relative_to(session / "alf").parts[0]) for f in probes))
