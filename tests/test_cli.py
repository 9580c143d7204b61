"""User errors are one line with exit status 2; bugs keep their traceback."""

import subprocess
import sys

import pytest

from ibl_jax import cli
from ibl_jax.errors import UserError


def test_user_error_is_one_line_and_status_2(capsys):
  def bad_input():
    raise UserError("session abc, split test, column spikes_data: counts outside 0..255\n(details)")
  result, status = cli.run_guarded(bad_input)
  assert (result, status) == (None, 2)
  assert capsys.readouterr().err == "error: session abc, split test, column spikes_data: counts outside 0..255\n"


def test_a_bug_is_not_disguised_as_a_user_error():
  def bug():
    return {}["missing"] + int("x")
  with pytest.raises(KeyError):
    cli.run_guarded(bug)
  with pytest.raises(ValueError):  # a plain ValueError from our code is a bug, not bad input
    cli.run_guarded(lambda: int("not a number"))


def test_cli_on_a_missing_session_prints_one_line_and_no_traceback(tmp_path, subprocess_env):
  proc = subprocess.run([sys.executable, "-m", "ibl_jax.data", "info", str(tmp_path / "nope")], env=subprocess_env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
  assert "Traceback" not in proc.stderr and str(tmp_path / "nope") in proc.stderr


def test_evaluate_and_predict_split_a_cpu_host_as_their_run_trained(tmp_path, subprocess_env):
  # A run directory as training writes it (config.json, corpus.json) whose session is gone: the commands split
  # the CPU into the run's mesh.cpu_devices before anything else, then stop with their one-line error.
  import json  # pylint: disable=g-import-not-at-top
  from ibl_jax import configs  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  run.mkdir()
  config = configs.get_config("ndt1")
  config.mesh.cpu_devices = 3
  (run / "config.json").write_text(config.to_json())
  (run / "corpus.json").write_text(json.dumps({"eids": ["s0"], "sources": [str(tmp_path / "s0")], "num_neurons": [10],
                                               "region_vocab": ["VISp"]}))
  env = {k: v for k, v in subprocess_env.items() if k != "XLA_FLAGS"}
  for command in ("from ibl_jax import evaluate as m", "from ibl_jax import predict as m"):
    extra = ", '--out', r'%s'" % (tmp_path / "out") if "predict" in command else ""
    code = (f"{command}\nimport jax\nstatus = m.main(['--checkpoint', r'{run}'{extra}])\n"
            "print('status', status, 'devices', jax.device_count())")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1:] == ["status 2 devices 3"], (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: session ")
  # Called after JAX has started (a command's main run in-process, as tests do), the split is left as it is.
  from ibl_jax import parallel  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.device_count()
  parallel.set_cpu_devices(before + 1)
  assert jax.device_count() == before


def test_a_step_command_with_an_unknown_malloc_mode_stops_with_one_line_before_writing(tmp_path, subprocess_env):
  proc = subprocess.run([sys.executable, "-m", "ibl_jax.train", "--config=configs/ndt1.py",
                         f"--config.results_dir={tmp_path / 'results'}", "--config.mesh.reuse_freed_memory=one-arena"],
                        env=subprocess_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: mesh.reuse_freed_memory='one-arena': use one of one_arena, thread_arenas or false"]
  assert not (tmp_path / "results").exists()
