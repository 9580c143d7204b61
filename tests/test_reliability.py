"""Faults of a shared cluster, injected through child processes and damaged files; nothing saved is lost.

Damaged checkpoints, kills at several moments (one inside Orbax's save), unwritable or full disks, a failed
save, resuming onto changed data, two runs in one directory, non-finite losses and inputs, library noise.
"""

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ibl_jax import checkpoint, rundir, runs, train
from ibl_jax.data import sessions as sessions_lib
from ibl_jax.errors import UserError

from conftest import REPO, tiny_config


def _curve(run_dir: Path) -> dict[int, float]:
  """Train loss per step; each step is logged once (a resumed run drops the rows of the steps it replays)."""
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["kind"]) for r in rows]
  assert len(keys) == len(set(keys)), f"rows logged twice in {run_dir / 'metrics.jsonl'}"
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _steps(run_dir: Path) -> list[str]:
  return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _cli_args(corpus_dir, results, run_name, **overrides) -> list[str]:
  """`--config.x=y` flags giving `tiny_config` exactly, on one CPU device as in this test process."""
  flags = {"data.sessions": corpus_dir / "train_eids.txt", "results_dir": results, "run_name": run_name,
           "data.batch_size": 8, "model.n_channels": 16, "model.hidden_size": 16, "model.num_layers": 1,
           "model.num_heads": 2, "model.mlp_size": 32, "training.num_steps": 6, "training.log_every": 1,
           "training.eval_every": 3, "training.checkpoint_every": 3, "training.eval_batches": 1,
           "training.quick_cosmooth_neurons": 4, "training.learning_rate": 3e-3, "mesh.cpu_devices": 1,
           **overrides}
  return ["--config=configs/ndt1.py", *(f"--config.{k}={v}" for k, v in flags.items())]


# A training CLI that dies (SIGKILL, nothing flushed or cleaned) at one chosen moment, or whose disk fails.
CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    where, n = sys.argv[1], int(sys.argv[2])
    sys.argv = ["ibl_jax.train", *sys.argv[3:]]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "commit":  # inside Orbax's save of step n: every file written, the committing rename not yet done
      from orbax.checkpoint._src.path import atomicity
      finalize = atomicity.AtomicRenameTemporaryPath.finalize
      async def killing_finalize(self):
        if self._final_path.name == str(n):
          die()
        return await finalize(self)
      atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
    elif where == "line":  # half way through writing the metrics line of step n
      from ibl_jax import monitor
      scalars = monitor.Monitor.scalars
      def killing_scalars(self, step, values, kind="train"):
        if step == n and kind == "train":
          self._jsonl.write('{"step": %d, "kind": "tr' % n)
          self._jsonl.flush()
          die()
        return scalars(self, step, values, kind=kind)
      monitor.Monitor.scalars = killing_scalars
    elif where == "disk_full_at_save":  # from the save of step n on, no file can grow (EFBIG, as ENOSPC would)
      from ibl_jax import checkpoint
      save = checkpoint.Checkpointer.save
      def failing_save(self, step, **kw):
        if step == n:
          signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
          resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        return save(self, step, **kw)
      checkpoint.Checkpointer.save = failing_save
    elif where == "no_writes":  # no file can grow from the start of the run on (imports may use /tmp before)
      from ibl_jax import rundir
      check = rundir.check_writable
      def full_disk_check(run_dir):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        return check(run_dir)
      rundir.check_writable = full_disk_check
    from ibl_jax import train
    train.cli()
""")


def _child(env, where, n, args, timeout=300):
  return subprocess.run([sys.executable, "-c", CHILD, where, str(n), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def base_run(corpus_dir, tmp_path_factory):
  """An uninterrupted 6-step run: checkpoints at steps 3 and 6, the loss curve every other run must match."""
  results = tmp_path_factory.mktemp("base")
  train.train_and_evaluate(tiny_config(corpus_dir, results, run_name="base"))
  return results / "base"


def _copy(base_run: Path, tmp_path: Path, name: str) -> Path:
  """The base run as if stopped before its end (no summary.json: a rerun trains rather than reports it done)."""
  run = tmp_path / name
  shutil.copytree(base_run, run)
  (run / "summary.json").unlink()
  config = json.loads((run / "config.json").read_text())
  config["run_name"], config["results_dir"] = name, str(tmp_path)
  (run / "config.json").write_text(json.dumps(config))  # as if this run had been started here
  return run


def _damage(run: Path, step: int) -> None:
  """Truncates every data file of a step's parameters to half (torn writes, a bad disk)."""
  for path in (run / "checkpoints" / str(step) / "params").rglob("d/*"):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# --------------------------------------------------------------------------------- 1. damaged checkpoints


def test_damaged_latest_checkpoint_resumes_from_the_one_before(base_run, corpus_dir, tmp_path, capfd):
  run = _copy(base_run, tmp_path, "damaged")
  _damage(run, 6)
  summary = train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, run_name="damaged"))
  err = capfd.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and "step 6" in warnings[0] and "cannot be restored (" in warnings[0], err
  assert summary["start_step"] == 3 and summary["completed"]
  # The damaged step is kept aside, not deleted; step 6 was saved again and the curve is the uninterrupted one.
  assert _steps(run) == ["3", "6", "6.damaged"]
  got, want = _curve(run), _curve(base_run)
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-6)


def test_no_checkpoint_restores_is_one_line_and_exit_2(base_run, corpus_dir, tmp_path, subprocess_env):
  run = _copy(base_run, tmp_path, "ruined")
  _damage(run, 3)
  _damage(run, 6)
  out = subprocess.run([sys.executable, "-m", "ibl_jax.train", *_cli_args(corpus_dir, tmp_path, "ruined")],
                       cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  errors = _error_lines(out.stderr)
  assert len(errors) == 1 and "no checkpoint in" in errors[0] and "resume=False" in errors[0], out.stderr
  assert _steps(run) == ["3", "6"]  # nothing set aside or deleted when there is nothing to resume from


def test_evaluate_predict_and_finetune_from_a_damaged_step_name_it(base_run, corpus_dir, tmp_path, capsys):
  run = _copy(base_run, tmp_path, "ev")
  _damage(run, 6)
  opened = runs.open_run(run)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint step 6 in .* cannot be restored \("):
    runs.load_params(opened, 6)
  _, params, step = runs.load_params(opened, 3)  # the step beside it is intact
  assert step == 3 and checkpoint.all_finite(params)
  from ibl_jax import evaluate  # pylint: disable=import-outside-toplevel
  assert evaluate.main(["--checkpoint", str(run / "checkpoints" / "6"), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint step 6 in") and "cannot be restored (" in err[0], err
  from ibl_jax import predict  # pylint: disable=import-outside-toplevel
  assert predict.main(["--checkpoint", str(run / "checkpoints" / "6"), "--out", str(tmp_path / "pred"),
                       "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: checkpoint step 6 in") and "cannot be restored (" in err[0], err
  # Fine-tuning reads the best step: damaged, it is named before any training.
  from ibl_jax import finetune  # pylint: disable=import-outside-toplevel
  from test_finetune import _finetune_config  # pylint: disable=import-outside-toplevel
  reader = checkpoint.Checkpointer(run / "checkpoints", read_only=True)
  best = checkpoint.resolve_step(reader, "best")
  reader.close()
  if best != 6:
    _damage(run, best)
  config = _finetune_config(corpus_dir, tmp_path, run, str(corpus_dir / "test_eids.txt"))
  with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint step {best} in .* cannot be restored"):
    finetune.finetune(config)
  assert not (tmp_path / "ft").exists()


def test_restore_rejects_non_finite_parameters(base_run, tmp_path):
  """A checkpoint Orbax reads back whole can still hold NaN (flipped bits in raw data, a save from before the
  guard): it is not 'complete', and resuming skips it."""
  run = _copy(base_run, tmp_path, "nan")
  ckpt = checkpoint.Checkpointer(run / "checkpoints")
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.array, ckpt.restore_params(6)))
  leaves[0].flat[0] = np.nan
  ocp = checkpoint.ocp  # Orbax directly: `Checkpointer.save` is only ever given finite parameters by training
  ckpt.manager.save(9, args=ocp.args.Composite(
      params=ocp.args.StandardSave(jax.tree.unflatten(treedef, leaves)),
      opt_state=ocp.args.StandardSave({"m": np.zeros(1)}), meta=ocp.args.JsonSave(ckpt.restore_meta(6))), force=True)
  ckpt.close()
  with pytest.raises(checkpoint.CheckpointError, match=r"step 9 .* cannot be restored \(its parameters hold NaN"):
    runs.load_params(runs.open_run(run), 9)


# ---------------------------------------------------------------------------- 2. killed at any moment


def test_killed_at_several_moments_resumes_and_reproduces_the_loss_curve(base_run, corpus_dir, tmp_path,
                                                                        subprocess_env):
  args = _cli_args(corpus_dir, tmp_path, "killed", **{"training.eval_every": 1000})  # no validation: faster
  run = tmp_path / "killed"
  # Inside the save of step 6: all of it written, not committed. Step 3 is the last complete checkpoint.
  out = _child(subprocess_env, "commit", 6, args)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert [p for p in _steps(run) if p.isdigit()] == ["3"]
  assert any(p.startswith("6.orbax-checkpoint-tmp") for p in _steps(run)), _steps(run)
  assert (run / "run.lock").exists()  # left behind by the killed run
  # Half way through writing step 5's metrics line, after resuming from step 3.
  out = _child(subprocess_env, "line", 5, args)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert "from step 3" in out.stderr and "took over the lock" in out.stderr, out.stderr[-3000:]
  assert not (run / "metrics.jsonl").read_text().endswith("\n")
  # Mid-interval, from outside: SIGKILL as soon as this run has logged a step.
  log = run / "metrics.jsonl"
  whole = len(log.read_bytes().rsplit(b"\n", 1)[0]) + 1  # what the run keeps of the log when it starts
  proc = subprocess.Popen([sys.executable, "-m", "ibl_jax.train", *args], cwd=REPO, env=subprocess_env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline and b'"train"' not in log.read_bytes()[whole:]:
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.kill()
  proc.communicate()
  # The rerun completes; every line of the log parses, no unfinished save is left, the curve is unchanged.
  summary = train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, run_name="killed",
                                                 **{"training.eval_every": 1000, "mesh.cpu_devices": 1}))
  assert summary["start_step"] == 3 and summary["completed"]
  assert _steps(run) == ["3", "6"]
  got, want = _curve(run), _curve(base_run)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-6)


# ------------------------------------------------------------------------- 3. unwritable or full disk


def test_unwritable_or_full_results_dir_stops_before_any_compute(corpus_dir, tmp_path, monkeypatch,
                                                                subprocess_env):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(UserError, match=r"results directory .* is not writable"):
    train.train_and_evaluate(tiny_config(corpus_dir, blocker / "results"))
  # No file can be written at all (as on a full disk): one line and exit 2 from the CLI.
  out = _child(subprocess_env, "no_writes", 0, _cli_args(corpus_dir, tmp_path, "nowrite"))
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert len(_error_lines(out.stderr)) == 1 and "not writable" in out.stderr, out.stderr
  # Too little free space for the checkpoints: refused before the model is initialised.
  monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
  with pytest.raises(UserError, match=r"1 MiB free, but the run needs about"):
    train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, run_name="full"))
  assert not (tmp_path / "full" / "metrics.jsonl").exists() and not (tmp_path / "full" / "run.lock").exists()


def test_failed_save_keeps_the_previous_checkpoint_and_stops_with_one_line(corpus_dir, tmp_path, subprocess_env):
  out = _child(subprocess_env, "disk_full_at_save", 6, _cli_args(corpus_dir, tmp_path, "full_at_6"))
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = _error_lines(out.stderr)
  assert len(errors) == 1 and "saving checkpoint step 6" in errors[0] and "(3) are intact" in errors[0], errors
  run = tmp_path / "full_at_6"
  assert [p for p in _steps(run) if p.isdigit()] == ["3"]
  _, params, _ = runs.load_params(runs.open_run(run), 3)
  assert checkpoint.all_finite(params)


# ---------------------------------------------------------------------------------- 4. changed data


def test_resume_onto_changed_data_names_the_session_and_difference(base_run, corpus_dir, tmp_path):
  run = _copy(base_run, tmp_path, "changed")
  eids = [e for e in (corpus_dir / "train_eids.txt").read_text().split() if e]
  # Fewer neurons: one region left out, chosen so that every session keeps some neurons.
  saved = json.loads((run / "corpus.json").read_text())
  recorded = [set(s.regions.tolist()) for s in sessions_lib.load_corpus(str(corpus_dir / "train_eids.txt")).sessions]
  drop = next(r for r in saved["region_vocab"] if all(regions - {r} for regions in recorded))
  keep = ",".join(r for r in saved["region_vocab"] if r != drop)
  with pytest.raises(UserError, match=r"onto changed data: session \S+ has \d+ neurons, the run was trained with"):
    train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, run_name="changed", **{"data.regions": keep}))
  # A session dropped from the list.
  fewer = tmp_path / "fewer.txt"
  fewer.write_text("\n".join(str(corpus_dir / e) for e in eids[:-1]))
  with pytest.raises(UserError, match=r"onto changed data: session \S+ is missing"):
    train.train_and_evaluate(tiny_config(corpus_dir, tmp_path, run_name="changed", **{"data.sessions": str(fewer)}))
  assert json.loads((run / "corpus.json").read_text()) == saved  # the run's record is untouched


# ----------------------------------------------------------------------------- 5. one run per directory


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ibl_jax import rundir
    rundir.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_run_refuses_and_a_dead_runs_lock_does_not_stick(corpus_dir, tmp_path, subprocess_env):
  run = tmp_path / "tiny"
  run.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, env=subprocess_env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"is in use by another run \(pid {holder.pid} on {socket.gethostname()}"):
      train.train_and_evaluate(tiny_config(corpus_dir, tmp_path))
    assert not (run / "config.json").exists()  # refused before touching the run
  finally:
    holder.kill()
    holder.wait()
  lock = rundir.RunLock(run)
  assert "is gone" in lock.acquire()
  lock.release()
  assert not (run / "run.lock").exists()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
  lock_file = tmp_path / rundir.LOCK_NAME
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
  with pytest.raises(UserError, match="pid 1 on elsewhere"):
    rundir.RunLock(tmp_path).acquire()
  old = time.time() - rundir.STALE_AFTER_S - 5
  os.utime(lock_file, (old, old))
  lock = rundir.RunLock(tmp_path)
  assert "no heartbeat from elsewhere" in lock.acquire()
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  lock.release()


# --------------------------------------------------------------------- 6. a process of a run dies


def test_a_dead_process_ends_the_others_and_all_rerun_resume(corpus_dir, tmp_path, subprocess_env):
  from test_multihost import _free_port  # pylint: disable=import-outside-toplevel
  env = {**subprocess_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  run = tmp_path / "mp"

  def launch(**overrides):
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "ibl_jax.train", *_cli_args(corpus_dir, tmp_path, "mp", **{
            "training.num_steps": 1000, "training.eval_every": 1000, "training.checkpoint_every": 2,
            "distributed.coordinator": f"localhost:{port}",
            "distributed.num_processes": 2, "distributed.process_id": i, "distributed.heartbeat_timeout_s": 10,
            **overrides})], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]

  procs = launch()
  deadline = time.time() + 400
  while not ((run / "checkpoints" / "2").exists() and b'"step": 3,' in _read(run / "metrics.jsonl")):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.05)
  procs[1].kill()
  try:  # gloo sees the connection drop at once; the heartbeat timeout (10 s here) bounds every other case
    _, err = procs[0].communicate(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("process 0 kept running 120 s after process 1 died")
  assert procs[0].returncode != 0
  assert "another task died" in err or "Connection reset" in err or "Gloo" in err, err[-3000:]
  procs = launch(**{"training.stop_after": 5})
  outs = [p.communicate(timeout=400)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
  assert "resuming" in outs[0] and "changed config" not in outs[0], outs[0][-3000:]
  summary = json.loads((run / "summary.json").read_text())
  assert summary["start_step"] >= 2 and summary["steps"] == 5 and summary["processes"] == 2


def _read(path: Path) -> bytes:
  return path.read_bytes() if path.exists() else b""


# ------------------------------------------------------------------------------------- 7. non-finite


def test_nan_loss_stops_naming_step_and_scheme_and_never_saves_non_finite(corpus_dir, tmp_path):
  # A learning rate of 1e30 blows up in a step or two; a checkpoint every step, logs only every 100 steps, so
  # the check before each save (not the logging) is what must stop it.
  config = tiny_config(corpus_dir, tmp_path, run_name="nan", **{
      "training.learning_rate": 1e30, "training.warmup_fraction": 0.0, "training.checkpoint_every": 1,
      "training.log_every": 100, "training.eval_every": 100})
  with pytest.raises(train.TrainingDiverged, match=r"(at step \d+ \(masking scheme [a-z-]+\))|(after step \d+)") as e:
    train.train_and_evaluate(config)
  assert "\n" not in str(e.value)
  ckpt = checkpoint.Checkpointer(tmp_path / "nan" / "checkpoints", read_only=True)
  for step in ckpt.all_steps():
    assert checkpoint.all_finite(ckpt.restore_params(step)), step
  ckpt.close()


@pytest.mark.parametrize("column,value", [("wheel-speed", math.inf), ("choice", math.nan),
                                          ("spikes_sparse_data", math.nan)])
def test_non_finite_input_is_rejected_naming_session_split_column(tmp_path, column, value):
  from test_data import _bad_session, _set  # pylint: disable=import-outside-toplevel

  def put(row):
    v = row[column]
    if column == "spikes_sparse_data":  # counts written as floats, one of them NaN
      return [value] + [float(x) for x in v[1:]]
    return [value] + v[1:] if isinstance(v, list) else value

  path = _bad_session(tmp_path, _set(column, put, split="val", trial=1))
  with pytest.raises(sessions_lib.SessionError) as e:
    sessions_lib.load_session(path)
  assert str(e.value).startswith(f"session sess-a, split 'val', column '{column}': trial 1"), str(e.value)


# ------------------------------------------------------------------------------------------ 8. noise


def test_checkpoints_without_metrics_print_no_orbax_warning(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path / "c", keep=1)
  with caplog.at_level(logging.INFO):
    ckpt.save(1, params={"w": jax.numpy.ones(2)}, opt_state={"m": jax.numpy.zeros(1)}, meta={"step": 1})
    ckpt.close()
    reader = checkpoint.Checkpointer(tmp_path / "c", read_only=True)  # as evaluation opens a run
    assert reader.all_steps() == [1]
    reader.close()
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


def test_orbax_sibling_task_failures_are_not_logged_but_others_are(caplog):
  """A damaged checkpoint fails several of Orbax's read tasks; the first is our one-line error, the rest must not
  print "Task exception was never retrieved" tracebacks when collected (seen in CI). Other tasks still do."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top

  async def async_deserialize():
    raise ValueError("OUT_OF_RANGE: Error reading byte range of the damaged file")

  async def someone_elses_coroutine():
    raise ValueError("a failure that is not Orbax's")

  async def leave_failed_tasks():
    for coro in (async_deserialize(), someone_elses_coroutine()):
      asyncio.ensure_future(coro)
    await asyncio.sleep(0.01)

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_failed_tasks())
    loop.close()
    gc.collect()
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert not any("async_deserialize" in m for m in logged), logged
  assert any("someone_elses_coroutine" in m for m in logged), logged
