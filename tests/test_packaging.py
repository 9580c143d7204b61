"""The package installs with every module and its configs, and configs are found from any directory."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from ibl_jax import configs

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_ships_the_configs():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  listed = set(project["tool"]["setuptools"]["packages"])
  on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ibl_jax").rglob("__init__.py")}
  assert on_disk - listed == set(), "add the new package to pyproject.toml's packages"
  assert project["tool"]["setuptools"]["package-dir"]["ibl_jax.config_files"] == "configs"
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
  # C++ kernel sources are compiled on first use, so an installed package must carry them.
  sources = {p.parent for p in (REPO / "ibl_jax").rglob("*.cc")}
  data = project["tool"]["setuptools"]["package-data"]
  for folder in sources:
    assert "*.cc" in data[".".join(folder.relative_to(REPO).parts)]


def test_config_names_resolve_outside_the_repository(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = configs.config_dir() / "ndt1.py"
  for value in ("configs/ndt1.py:paper", "ndt1:paper", "configs.ndt1:paper", "ndt1.py:paper"):
    assert configs.resolve_config_path(value) == f"{shipped}:paper"
  assert configs.resolve_config_path("ndt1") == str(shipped)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "ndt1.py").write_text("")  # a user's own file of that name wins
  assert configs.resolve_config_path("configs/ndt1.py") == "configs/ndt1.py"
  assert configs.resolve_config_path("nonexistent") == "nonexistent"  # config_flags then names it


def test_train_runs_from_another_directory_with_a_config_name(corpus_dir, tmp_path, subprocess_env):
  args = [f"--config.data.sessions={corpus_dir / 'train_eids.txt'}", f"--config.results_dir={tmp_path}",
          "--config.run_name=elsewhere", "--config.training.num_steps=1", "--config.training.eval_every=1",
          "--config.training.checkpoint_every=1", "--config.model.num_layers=1", "--config.model.hidden_size=16",
          "--config.model.n_channels=16", "--config.model.mlp_size=32", "--config.model.num_heads=2",
          "--config.data.batch_size=8"]
  proc = subprocess.run([sys.executable, "-m", "ibl_jax.train", "--config=ndt1_temporal", *args], cwd=tmp_path,
                        env=subprocess_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "elsewhere" / "summary.json").exists()
  assert json.loads((tmp_path / "elsewhere" / "config.json").read_text())["masking"]["scheme"] == "temporal"
