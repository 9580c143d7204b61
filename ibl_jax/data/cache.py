"""Decoded sessions as plain `.npy` arrays on disk, memory-mapped on every later open (docs/design.md §3).

An entry is a directory of `.npy` files plus `manifest.json` (the source's fingerprint, each array's shape, dtype
and file size). It is written into a temporary sibling and renamed into place, so a reader sees a whole entry or
none; a per-entry `flock` makes concurrent processes on one node build it once (the others wait, then open it).
On open every array's file size, shape and dtype is checked against the manifest: a truncated or missing file
is a damaged entry, rebuilt with a one-line note, never used.

Invalidation: the fingerprint is the relative path, size and mtime (ns) of every file of the source directory
(the Arrow files, state.json, dataset_info.json, dataset_dict.json). A content hash would read every byte on
every start (minutes at Brain-Wide-Map scale); `save_to_disk` rewrites files, which changes size or mtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT = 2  # bump when the layout or the decoding changes: every existing entry is then stale (2: mean counts)
MANIFEST = "manifest.json"
DEFAULT_DIRNAME = ".ibl_jax_cache"  # beside the data: <parent of the session directory>/.ibl_jax_cache/<name>
OFF = ("off", "none", "false", "0")


class Damaged(Exception):
  """An entry that exists but cannot be trusted (missing or truncated file, bad manifest)."""


def session_dir(source: str, setting: str | None, hub_cache: str | None = None) -> Path | None:
  """Where the entries of one session live; None when caching is off (`setting` in `OFF`).

  `setting` None: beside the data for a local directory (`<parent>/.ibl_jax_cache/<name>`), under the hub cache
  (or ~/.cache/ibl_jax) for a hub id. A directory: `<setting>/<name>-<hash of the absolute source>`.
  """
  if setting is not None and str(setting).lower() in OFF:
    return None
  path = Path(source).expanduser()
  if path.exists():
    path = path.resolve()
    tag = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if setting is None:
      default = path.parent / DEFAULT_DIRNAME / path.name
      return default if _writable(path.parent) else _user_cache() / tag
    return Path(setting).expanduser() / tag
  tag = source.replace("/", "__")
  root = Path(setting).expanduser() if setting is not None else (
      Path(hub_cache).expanduser() / "ibl_jax_arrays" if hub_cache else _user_cache())
  return root / tag


def _user_cache() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ibl_jax" / "arrays"


def _writable(path: Path) -> bool:
  probe = path / DEFAULT_DIRNAME
  return os.access(probe if probe.exists() else path, os.W_OK)


def fingerprint(path: Path) -> list[list]:
  """[relative path, size, mtime_ns] of every file under a source directory, sorted (cache entries excluded)."""
  out = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if d != DEFAULT_DIRNAME)
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
  return out


def files_fingerprint(files: list[str]) -> list[list]:
  """The same for an explicit list of files (a hub dataset's Arrow cache files)."""
  return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files)]


# ---------------------------------------------------------------------------------------------- one entry


def open_entry(path: Path, key: dict) -> tuple[dict[str, np.ndarray], dict] | None:
  """The entry's arrays (read-only memory maps) and meta; None when absent or made from another source.

  Raises `Damaged` when the entry exists but a file is missing, truncated or not what the manifest says.
  """
  manifest_path = path / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(manifest_path.read_text())
  except (OSError, ValueError) as e:
    raise Damaged(f"{manifest_path}: unreadable ({type(e).__name__})") from None
  if manifest.get("format") != FORMAT or manifest.get("key") != json.loads(json.dumps(key)):
    return None
  arrays = {}
  for name, spec in manifest["arrays"].items():
    file = path / f"{name}.npy"
    try:
      arrays[name] = _map(file, spec)
    except FileNotFoundError:
      raise Damaged(f"{file}: missing") from None
    except (OSError, ValueError) as e:
      raise Damaged(f"{file}: unreadable ({type(e).__name__}: {e})") from None
  return arrays, manifest["meta"]


def _map(file: Path, spec: dict) -> np.ndarray:
  """The `.npy` file's array as a read-only view of a memory map, checked against its manifest entry.

  What `np.load(mmap_mode="r")` does, without `np.memmap`'s per-call cost (a start-up opens ~20 arrays per
  session, thousands for a large corpus).
  """
  with open(file, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size != spec["bytes"]:
      raise Damaged(f"{file}: {size} bytes, the manifest says {spec['bytes']}")
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
      raise Damaged(f"{file}: .npy format version {version}, written by something else")
    shape, fortran_order, dtype = read_header[version](f)
    if list(shape) != spec["shape"] or dtype.str != spec["dtype"] or fortran_order:
      raise Damaged(f"{file}: {dtype.str} {list(shape)}, the manifest says {spec['dtype']} {spec['shape']}")
    count = int(np.prod(shape))
    if count == 0:  # nothing to map (mmap refuses empty files)
      return np.empty(shape, dtype)
    offset = f.tell()
    if offset + count * dtype.itemsize != size:
      raise Damaged(f"{file}: {size} bytes, but its header says {offset} + {count * dtype.itemsize}")
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # Batches read scattered trials: without this, each page fault reads ahead and maps ~1 MB around the trial
    # (256 sessions x 20 batches: 387 MB of mapped page cache for 10 MB of trials).
    if hasattr(mmap, "MADV_RANDOM"):  # Linux, macOS
      mapped.madvise(mmap.MADV_RANDOM)
  array = np.frombuffer(mapped, dtype, count=count, offset=offset).reshape(shape)
  _register(array, str(file), offset)
  return array


# The mapped arrays that `take_trials` reads with `pread`: id -> (weak reference, file, data offset).
_MAPPED: dict[int, tuple[weakref.ref, str, int]] = {}


def _register(array: np.ndarray, file: str, offset: int) -> None:
  key = id(array)
  _MAPPED[key] = (weakref.ref(array, lambda _: _MAPPED.pop(key, None)), file, offset)


def _mapped_source(array: np.ndarray) -> tuple[str, int] | None:
  """(file, data offset) of an array `_map` returned (not a view or copy of one); None for any other."""
  entry = _MAPPED.get(id(array))
  return None if entry is None or entry[0]() is not array else entry[1:]


def take_trials(array_KxR: np.ndarray, trials_M: np.ndarray) -> np.ndarray:
  """`array_KxR[trials_M]` (rows of the first axis; a new array). For an array mapped from the cache, the rows
  are read from its file with `pread` instead of through the map: reading through the map leaves the pages it
  touched mapped into the process, and batches over many sessions would grow its RSS with every session they
  visit (by whole large folios when the file is in the page cache as such: 400 MB over 20 batches of 256
  sessions). Read so, the trials pass through the page cache into the batch and nothing stays mapped."""
  source = _mapped_source(array_KxR)
  trials_M = np.asarray(trials_M, np.int64)
  if source is None or trials_M.ndim != 1:
    return array_KxR[trials_M]
  file, offset = source
  K = array_KxR.shape[0]
  if trials_M.size and (trials_M.min() < -K or trials_M.max() >= K):
    raise IndexError(f"trial index out of range for {K} trials ({file})")
  trials_M = trials_M % max(K, 1)
  out = np.empty((len(trials_M), *array_KxR.shape[1:]), array_KxR.dtype)
  row_bytes = out[0].nbytes if len(out) else 0
  view = memoryview(out.reshape(len(out), -1).view(np.uint8)) if len(out) else None
  fd = os.open(file, os.O_RDONLY)
  try:
    i = 0
    while i < len(trials_M):  # runs of consecutive trials in one read each
      j = i + 1
      while j < len(trials_M) and trials_M[j] == trials_M[j - 1] + 1:
        j += 1
      want = (j - i) * row_bytes
      got = os.preadv(fd, [view[i:j]], offset + int(trials_M[i]) * row_bytes)
      if got != want:
        raise OSError(f"{file}: read {got} of {want} bytes (truncated since it was opened?)")
      i = j
  finally:
    os.close(fd)
  return out


def in_memory(array: np.ndarray) -> np.ndarray:
  """A cache-mapped array read whole into private memory with `pread` (`take_trials`); any other array as is.
  For work on one session at a time (evaluation): the copy is freed with the session, where pages touched
  through the map would stay in the process's RSS for the rest of the run."""
  if _mapped_source(array) is None:
    return array
  return take_trials(array, np.arange(array.shape[0]))


def write_entry(path: Path, key: dict, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """Writes the entry into a temporary sibling, then renames it into place (replacing a stale or damaged one)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    specs = {}
    for name, arr in arrays.items():
      arr = np.ascontiguousarray(arr)
      np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
      specs[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str, "bytes": (tmp / f"{name}.npy").stat().st_size}
    # The manifest last: a directory without one is damaged, whatever else it holds.
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "key": key, "arrays": specs, "meta": meta}))
    if path.exists():  # stale or damaged: move it aside first (a rename cannot replace a non-empty directory)
      old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
      with contextlib.suppress(OSError):
        os.rename(path, old / "entry")
      shutil.rmtree(old, ignore_errors=True)
    try:
      os.rename(tmp, path)
    except OSError:
      if not (path / MANIFEST).exists():  # else a concurrent writer (where flock does nothing) got there first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


_held: dict[str, int] = {}  # locks this process holds: `lock` is re-entrant within a process


@contextlib.contextmanager
def lock(directory: Path):
  """An exclusive lock on a session's cache directory: concurrent builders wait rather than all decoding it.

  Re-entrant within a process. The rename in `write_entry` keeps readers safe even where `flock` does nothing
  (some network filesystems).
  """
  name = str(directory)
  if _held.get(name):
    _held[name] += 1
    try:
      yield
    finally:
      _held[name] -= 1
    return
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".lock", "a+") as f:
    with contextlib.suppress(OSError):
      fcntl.flock(f, fcntl.LOCK_EX)
    _held[name] = 1
    try:
      yield
    finally:
      _held[name] = 0  # closing the file releases the flock


def current(path: Path, key: dict) -> bool:
  """Whether the entry's manifest says it was made from `key` (its files are checked by `open_entry`)."""
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, ValueError):
    return False
  return manifest.get("format") == FORMAT and manifest.get("key") == json.loads(json.dumps(key))


def cached(path: Path, key: dict, build: Callable[[], tuple[dict[str, np.ndarray], dict]],
           *, what: str) -> tuple[dict[str, np.ndarray], dict]:
  """Opens the entry at `path` made from `key`, building it with `build()` first when absent, stale or damaged."""
  try:
    found = open_entry(path, key)
    if found is not None:
      return found
  except Damaged:
    pass  # reported below, under the lock, by whichever process rebuilds it
  with lock(path.parent):
    try:
      found = open_entry(path, key)  # another process may have built it while we waited
      if found is not None:
        return found
      if path.exists():
        print(f"note: cache of {what} at {path} is stale (its source files or the cache format changed); rebuilding", file=sys.stderr)
    except Damaged as e:
      print(f"note: cache of {what} is damaged ({e}); rebuilding", file=sys.stderr)
    arrays, meta = build()
    write_entry(path, key, arrays, meta)
  found = open_entry(path, key)
  if found is None:
    raise Damaged(f"{path}: just written, but its manifest does not match")
  return found
