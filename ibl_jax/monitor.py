"""What a run reports: TensorBoard scalars and figures, a JSON-lines metrics log, progress lines with an ETA.

Only process 0 writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ibl_jax import rundir


class Monitor:

  def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0):
    """`start_step`: the step a resumed run continues from; what was logged after it is replayed, so it is
    dropped (metrics.jsonl rows, TensorBoard events) rather than logged twice."""
    self.active = jax.process_index() == 0
    self.total_steps, self.run_dir = total_steps, run_dir
    self._t0, self._step0 = time.time(), None
    self.writer = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
      _drop_partial_line(run_dir / "metrics.jsonl")
      _drop_rows_after(run_dir / "metrics.jsonl", start_step)
      self._jsonl = open(run_dir / "metrics.jsonl", "a")  # pylint: disable=consider-using-with
      atexit.register(self._close_at_exit)  # runs before tensorboardX's own exit hook (registered earlier)

  def _close_at_exit(self) -> None:
    """A run stopped by an error (a full disk, say) still closes its logs; a flush that fails is one warning,
    not tracebacks from TensorBoard's writer thread and exit hook."""
    if self._jsonl.closed:
      return
    try:
      self.close()
    except OSError as e:
      # tensorboardX's writer thread and exit hook would retry the flush: stop the thread, mark it closed.
      for file_writer in (getattr(self.writer, "all_writers", None) or {}).values():
        events = file_writer.event_writer
        events._closed = True  # pylint: disable=protected-access
        if getattr(events, "_worker", None) is not None:
          events._worker.stop()  # pylint: disable=protected-access
      print(f"warning: could not write TensorBoard events to {self.run_dir / 'tb'} ({e.strerror or e})",
            file=sys.stderr)

  def scalars(self, step: int, values: dict[str, float], *, kind: str = "train") -> None:
    if not self.active:
      return
    for name, value in values.items():
      self.writer.add_scalar(f"{kind}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}) + "\n")
    self._jsonl.flush()

  def figure(self, step: int, name: str, fig) -> None:
    if self.active:
      self.writer.add_figure(name, fig, step, close=False)
      (self.run_dir / "figures").mkdir(exist_ok=True)
      fig.savefig(self.run_dir / "figures" / f"{name.replace('/', '_')}.png", dpi=100)
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    plt.close(fig)

  def progress(self, step: int, text: str) -> None:
    """One line: step, the caller's text, and the ETA from the rate since the first call."""
    if not self.active:
      return
    now = time.time()
    if self._step0 is None:
      self._step0, self._t0 = step, now
    done = step - self._step0
    eta = (self.total_steps - step) * (now - self._t0) / done if done > 0 else float("nan")
    print(f"step {step:>6}/{self.total_steps}  {text}  eta {_hms(eta)}", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.active:
      self.writer.close()
      self._jsonl.close()


def _drop_partial_line(path: Path) -> None:
  """A run killed mid-write leaves half a JSON line: cut it, so the resumed run appends whole lines."""
  if not path.exists() or path.stat().st_size == 0:
    return
  with open(path, "rb+") as f:
    data = f.read()
    if not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _drop_rows_after(path: Path, step: int) -> None:
  """Rewrites metrics.jsonl without rows past `step` (atomically; untouched when there are none)."""
  if not step or not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(kept) < len(lines):
    rundir.atomic_write_text(path, "".join(kept))


def _hms(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "--:--"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def rates_figure(pred_KxTxJ: np.ndarray, spikes_KxTxJ: np.ndarray, true_KxTxJ: np.ndarray | None,
                 titles: list[str], *, binsize_s: float = 0.02):
  """Trial-averaged rate (Hz) per neuron: observed counts, model prediction, and true rate when known."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  J = pred_KxTxJ.shape[-1]
  fig, axes = plt.subplots(1, J, figsize=(3 * J, 2.6), squeeze=False, sharex=True)
  t = np.arange(pred_KxTxJ.shape[1]) * binsize_s
  for j, ax in enumerate(axes[0]):
    ax.plot(t, spikes_KxTxJ[:, :, j].mean(0) / binsize_s, color="0.6", lw=1, label="observed")
    if true_KxTxJ is not None:
      ax.plot(t, true_KxTxJ[:, :, j].mean(0) / binsize_s, color="k", lw=1.5, label="true rate")
    ax.plot(t, pred_KxTxJ[:, :, j].mean(0) / binsize_s, color="C3", lw=1.5, label="predicted (held out)")
    ax.set_title(titles[j], fontsize=8)
    ax.set_xlabel("time (s)")
  axes[0][0].set_ylabel("rate (Hz)")
  axes[0][-1].legend(fontsize=7, frameon=False)
  fig.tight_layout()
  return fig
