"""Reader: an NWB file (e.g. an IBL Brain-Wide Map session on DANDI, dandiset 000409) → `Recording`, with pynwb.

  units    `spike_times` (ragged); region from each unit's electrodes' `location` (the first electrode), or
           the units column `region_column` (DANDI 000409: `allen_location`, used when the units table has no
           electrodes); QC from `label`; depth from `mean_relative_depth`; ids from `uuid` (all renamable).
  trials   columns named as in DANDI 000409 (`TRIAL_COLUMNS`: stim_on_time, first_movement_time, choice,
           feedback_type, feedback_time, probability_left, ...); each can be renamed.
  traces   wheel position and whisker motion energy from time series given as `module/name[/series]` paths
           (defaults: 000409's `behavior/CompassDirection/WheelPositionSeries`, `behavior/LeftCameraMotionEnergy`,
           then `behavior/RightCameraMotionEnergy`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibl_jax.data.prepare import PrepareError, Recording, Trace, check_spike_train, warn

# Our (IBL ALF) trial field -> the trials column in DANDI 000409's NWB files.
TRIAL_COLUMNS = {
    "stimOn_times": "stim_on_time", "firstMovement_times": "first_movement_time", "choice": "choice",
    "feedbackType": "feedback_type", "feedback_times": "feedback_time", "probabilityLeft": "probability_left",
    "goCue_times": "go_cue_time", "contrastLeft": "contrast_left", "contrastRight": "contrast_right",
    "intervals_0": "start_time", "intervals_1": "stop_time",
}
UNIT_COLUMNS = {"region": "allen_location", "qc": "label", "depth": "mean_relative_depth", "uuid": "uuid"}
WHEEL_PATHS = ("behavior/CompassDirection/WheelPositionSeries", "behavior/WheelPositionSeries")
MOTION_ENERGY_PATHS = ("behavior/LeftCameraMotionEnergy", "behavior/RightCameraMotionEnergy")


def _column(table, name: str):
  """A plain column's values, or None. (`table[name]` of a ragged column is its index, hence `columns`.)"""
  column = _raw(table, name)
  return None if column is None else column.data[:]


def _raw(table, name: str):
  return next((c for c in table.columns if c.name == name), None)


def _units(nwbfile, where: str, columns: dict[str, str], region_column_given: bool):
  units = nwbfile.units
  if units is None or len(units) == 0:
    raise PrepareError(f"{where}: no units table (units/spike_times)")
  if "spike_times" not in units.colnames:
    raise PrepareError(f"{where}, units column 'spike_times': missing")
  n = len(units)
  flat = np.asarray(_column(units, "spike_times"), np.float64)
  ends = np.asarray(_column(units, "spike_times_index"), np.int64)
  unit_S = np.repeat(np.arange(n, dtype=np.int32), np.diff(np.concatenate([[0], ends])))
  for u in range(n):  # per unit: finite, sorted (the merge below sorts across units)
    s = flat[(ends[u - 1] if u else 0):ends[u]]
    if s.size and (not np.all(np.isfinite(s)) or np.any(np.diff(s) < 0)):
      check_spike_train(s, np.zeros(len(s), np.int32), 1, f"{where}, units row {u}, column 'spike_times'",
                        f"{where}, units row {u}")
  order = np.argsort(flat, kind="stable")
  times, unit_S = flat[order], unit_S[order]
  check_spike_train(times, unit_S, n, f"{where}, units column 'spike_times'", f"{where}, units")
  regions = _regions(nwbfile, units, where, columns["region"], region_column_given)
  qc = _column(units, columns["qc"])
  qc = np.full(n, np.nan) if qc is None else np.asarray(qc, np.float64)
  depths = _column(units, columns["depth"])
  if depths is None:
    warn(f"{where}: no units column {columns['depth']!r}; depths are 0 (give --depth-column)")
    depths = np.zeros(n)
  uuids = _column(units, columns["uuid"])
  if uuids is None:
    uuids = np.array([f"{Path(where).stem}-unit{i}" for i in units.id[:]])
  return times, unit_S, regions, np.asarray(depths, np.float64), np.asarray(uuids, str), qc


def _regions(nwbfile, units, where: str, region_column: str, given: bool) -> np.ndarray:
  if not given and "electrodes" in units.colnames:
    electrodes = nwbfile.electrodes
    if electrodes is None or "location" not in electrodes.colnames:
      raise PrepareError(f"{where}, electrodes column 'location': missing (or give --region-column)")
    location = np.asarray(electrodes["location"].data[:], dtype=str)
    ends = np.asarray(_column(units, "electrodes_index"), np.int64)
    rows = np.asarray(_column(units, "electrodes"), np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    bad = np.flatnonzero(ends <= starts)
    if bad.size:
      raise PrepareError(f"{where}, units row {bad[0]}, column 'electrodes': the unit has no electrode "
                         f"(or give --region-column)")
    first = rows[starts]
    if np.any((first < 0) | (first >= len(location))):
      raise PrepareError(f"{where}, units column 'electrodes': electrode row out of range")
    out = location[first]
    column = "electrodes.location"
  else:
    values = _column(units, region_column)
    if values is None:
      raise PrepareError(f"{where}, units column {region_column!r}: missing (units have no electrodes either; "
                         f"name the region column with --region-column)")
    out = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    column = f"units.{region_column}"
  bad = np.flatnonzero(np.char.strip(out) == "")
  if bad.size:
    raise PrepareError(f"{where}, column {column!r}: unit {bad[0]} has no location")
  return out


def _trials(nwbfile, where: str, columns: dict[str, str]) -> dict[str, np.ndarray]:
  trials = nwbfile.trials
  if trials is None or len(trials) == 0:
    raise PrepareError(f"{where}: no trials table (give --unaligned for 2 s chunks of the whole recording)")
  out = {}
  for field, name in columns.items():
    values = _column(trials, name)
    if values is None:
      continue  # `prepare.trial_mask` names a required field that is missing
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
      raise PrepareError(f"{where}, trials column {name!r}: not numeric ({values.dtype})")
    out[field] = values.astype(np.float64)
  missing = [f for f in ("stimOn_times", "choice", "feedback_times", "probabilityLeft", "firstMovement_times",
                         "feedbackType") if f not in out]
  if missing:
    raise PrepareError(f"{where}, trials column {columns[missing[0]]!r}: missing (trials columns: "
                       f"{', '.join(trials.colnames)}; rename with --column {missing[0]}=NAME)")
  return out


def _series(nwbfile, path: str):
  """The time series at `module/name[/series]` in nwbfile.processing, or None."""
  parts = path.strip("/").split("/")
  node = nwbfile.processing.get(parts[0]) if parts else None
  for p in parts[1:]:
    if node is None:
      return None
    try:
      node = node[p]
    except (KeyError, TypeError):
      return None
  if node is not None and not hasattr(node, "data"):  # a container holding exactly one series
    children = list(getattr(node, "children", []))
    node = children[0] if len(children) == 1 and hasattr(children[0], "data") else None
  return node


def _trace(nwbfile, where: str, paths) -> Trace | None:
  for path in paths:
    series = _series(nwbfile, path)
    if series is None:
      continue
    data = np.asarray(series.data[:], np.float64)
    if data.ndim == 2 and data.shape[1] == 1:
      data = data[:, 0]
    if data.ndim != 1:
      raise PrepareError(f"{where}, {path}: expected one value per time point, got shape {data.shape}")
    if series.timestamps is not None:
      times = np.asarray(series.timestamps[:], np.float64)
    else:
      times = (series.starting_time or 0.0) + np.arange(len(data)) / series.rate
    return Trace(times, data, f"{where}, {path}")
  return None


def read_nwb(path: str | Path, *, regions: str = "allen", region_column: str | None = None,
             qc_column: str | None = None, depth_column: str | None = None, uuid_column: str | None = None,
             trial_columns: dict[str, str] | None = None, wheel: str | None = None,
             motion_energy: str | None = None, eid: str | None = None, need_trials: bool = True) -> Recording:
  """Reads an NWB file (see the module docstring). `trial_columns` renames {our field: NWB column}."""
  try:
    from pynwb import NWBHDF5IO  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise PrepareError("reading NWB needs pynwb: pip install pynwb") from None
  path = Path(path).expanduser()
  where = str(path)
  if not path.is_file():
    raise PrepareError(f"{where}: no such file")
  columns = {"region": region_column or UNIT_COLUMNS["region"], "qc": qc_column or UNIT_COLUMNS["qc"],
             "depth": depth_column or UNIT_COLUMNS["depth"], "uuid": uuid_column or UNIT_COLUMNS["uuid"]}
  unknown = sorted(set(trial_columns or {}) - set(TRIAL_COLUMNS))
  if unknown:
    raise PrepareError(f"--column {unknown[0]}=...: unknown trial field (fields: {', '.join(TRIAL_COLUMNS)})")
  tcols = {**TRIAL_COLUMNS, **(trial_columns or {})}
  try:
    io = NWBHDF5IO(str(path), mode="r", load_namespaces=True)
    nwbfile = io.read()
  except Exception as e:  # pylint: disable=broad-except  (h5py/hdmf raise many types for a non-NWB file)
    raise PrepareError(f"{where}: not a readable NWB file ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:160]})") from None
  with io:
    times, units, region, depths, uuids, qc = _units(nwbfile, where, columns, region_column is not None)
    trials = _trials(nwbfile, where, tcols) if need_trials else None
    wheel_trace = _trace(nwbfile, where, (wheel,) if wheel else WHEEL_PATHS)
    me = _trace(nwbfile, where, (motion_energy,) if motion_energy else MOTION_ENERGY_PATHS)
    for given, trace, label in ((wheel, wheel_trace, "--wheel"), (motion_energy, me, "--motion-energy")):
      if given and trace is None:
        raise PrepareError(f"{where}, {given}: no such time series in processing/ ({label})")
    subject = getattr(nwbfile.subject, "subject_id", "") if nwbfile.subject is not None else ""
    lab = nwbfile.lab or ""
    default_eid = nwbfile.session_id or nwbfile.identifier
  if regions != "allen":
    region = _map_acronyms(region, regions, where)
  return Recording(eid=eid or str(default_eid), source=str(path.resolve()), spike_times=times, spike_units=units,
                   regions=region, depths=depths, uuids=uuids, qc=qc, trials=trials,
                   trials_where=f"{where}, trials", wheel=wheel_trace, motion_energy=me, subject=str(subject or ""),
                   lab=str(lab), probe_name="")


def _map_acronyms(acronyms: np.ndarray, regions: str, where: str) -> np.ndarray:
  from iblatlas.regions import BrainRegions  # pylint: disable=g-import-not-at-top
  from ibl_jax.data.alf import REGION_MAPPINGS  # pylint: disable=g-import-not-at-top
  if regions not in REGION_MAPPINGS:
    raise PrepareError(f"--regions must be one of {', '.join(REGION_MAPPINGS)}, not {regions!r}")
  br = BrainRegions()
  unknown = ~np.isin(acronyms, br.acronym)
  if unknown.any():
    raise PrepareError(f"{where}: region {acronyms[unknown][0]!r} is not an Allen acronym, so it has no "
                       f"{regions} parent; use --regions allen")
  return np.asarray(br.acronym2acronym(acronyms, mapping=REGION_MAPPINGS[regions]), dtype=str)
