"""A run directory that survives a shared cluster: one run at a time, whole files, room to write.

- `RunLock`: `RUN_DIR/run.lock` holds the owner's pid, host and start time. A second run refuses while the
  owner lives; a lock whose owner is gone (same host: the pid is dead or reused; another host: no heartbeat
  for `STALE_AFTER_S`) is taken over, so a killed run never leaves the directory stuck.
- `atomic_write_text`: write beside, then rename, so a kill never leaves half a config.json or corpus.json.
- `check_writable`: at start, before any compute, the directory can be created and written, and the disk
  has room for the checkpoints the run will keep.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from ibl_jax.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 20.0  # the owner touches the lock this often
STALE_AFTER_S = 120.0  # a lock of another host untouched this long is stale (its owner cannot be asked)
_UNWRITTEN_GRACE_S = 10.0  # an empty or garbled lock younger than this is still being written


def atomic_write_text(path: str | Path, text: str) -> None:
  """`path.write_text(text)` that a kill leaves either old or new, never truncated."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _proc_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (field 22 of /proc/PID/stat): tells a reused pid from the owner."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _me() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stale_reason(holder: dict | None, age_s: float) -> str | None:
  """Why the lock of `holder` (its parsed content; None when unreadable) no longer holds, or None if it does."""
  if holder is None:
    return "unreadable" if age_s > _UNWRITTEN_GRACE_S else None
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
      return f"pid {pid} is gone"
    start = _proc_start(pid)
    if holder.get("proc_start") and start and start != holder["proc_start"]:
      return f"pid {pid} now belongs to another process"
    return None
  if age_s > STALE_AFTER_S:
    return f"no heartbeat from {holder.get('host')} for {age_s:.0f} s"
  return None


class RunLock:
  """Exclusive use of a run directory by one (multi-process) run; process 0 holds it."""

  def __init__(self, run_dir: str | Path):
    self.path = Path(run_dir) / LOCK_NAME
    self._stop = threading.Event()
    self._thread = None
    self.held = False

  def acquire(self) -> str | None:
    """Takes the lock; returns a note when a stale lock was taken over; raises `UserError` when it is held."""
    note = None
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder, age = self._read()
        reason = stale_reason(holder, age)
        if reason is None:
          raise UserError(  # pylint: disable=raise-missing-from
              f"{self.path.parent} is in use by another run (pid {holder.get('pid') if holder else '?'} on "
              f"{holder.get('host') if holder else '?'}, started {holder.get('started') if holder else '?'}; "
              f"lock {self.path}); wait for it to end or use another --config.run_name")
        note = f"took over the lock of a run that is no longer running ({reason})"
        try:
          self.path.unlink()
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(_me(), f)
      self.held = True
      self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
      self._thread.start()
      return note
    raise UserError(f"{self.path}: could not take the lock (another run keeps taking it)")

  def _read(self) -> tuple[dict | None, float]:
    try:
      age = time.time() - self.path.stat().st_mtime
      return json.loads(self.path.read_text()), age
    except FileNotFoundError:
      return None, float("inf")
    except (OSError, ValueError):
      return None, age

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    holder, _ = self._read()
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      self.path.unlink(missing_ok=True)
    self.held = False


def check_writable(run_dir: str | Path) -> None:
  """The run directory can be created and written (probe file, fsync'd): one line otherwise."""
  run_dir = Path(run_dir)
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / f".write_probe.{socket.gethostname()}.{os.getpid()}"  # one per process of a run
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    probe.unlink()
  except OSError as e:
    raise UserError(f"results directory {run_dir} is not writable ({e.strerror or e}); choose another "
                    f"--config.results_dir") from None


def check_free_space(run_dir: str | Path, need_bytes: int) -> None:
  """Room for what the run will write; a run that fills the disk hours in would lose those hours."""
  free = shutil.disk_usage(run_dir).free
  if free < need_bytes:
    raise UserError(f"results directory {run_dir}: {free / 2**20:.0f} MiB free, but the run needs about "
                    f"{need_bytes / 2**20:.0f} MiB (checkpoints and logs); free space or choose another "
                    f"--config.results_dir")
