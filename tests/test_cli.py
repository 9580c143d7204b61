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
