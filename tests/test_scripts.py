"""Slurm scripts in dry-run mode print the commands they would run (sbatch is not available on CI)."""

import subprocess

from conftest import REPO

SLURM = REPO / "scripts" / "slurm"


def _run(script, *args, env=None):
  out = subprocess.run(["bash", str(SLURM / script), *args], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=30)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip().splitlines()


def test_pretrain_dry_run(subprocess_env):
  env = {**subprocess_env, "SESSIONS": "/data/eids.txt", "RUN_NAME": "big"}
  (line,) = _run("pretrain.sbatch", "--dry-run", "configs/ndt1.py", "--config.data.batch_size=64", env=env)
  assert line == ("srun --kill-on-bad-exit=1 python -m ibl_jax.train --config=configs/ndt1.py "
                  "--config.data.sessions=/data/eids.txt --config.run_name=big --config.data.batch_size=64")


def test_finetune_array_picks_the_tasks_line(tmp_path, subprocess_env):
  eids = tmp_path / "eids.txt"
  eids.write_text("aaa\n# a comment\n\nbbb\n")
  (tmp_path / "bbb").mkdir()  # a session directory beside the file
  lines = {t: _run("finetune_array.sbatch", "--dry-run", str(eids), "results/ndt1_mtm",
                   env={**subprocess_env, "SLURM_ARRAY_TASK_ID": str(t)})[0] for t in (1, 2)}
  assert "--config.data.sessions=aaa " in lines[1] and "--config.run_name=aaa" in lines[1]
  assert f"--config.data.sessions={tmp_path / 'bbb'} " in lines[2]
  assert "--config.results_dir=results/finetune_ndt1_mtm" in lines[2]
  assert lines[2].startswith("python -m ibl_jax.finetune --config=configs/finetune.py "
                             "--config.pretrained=results/ndt1_mtm")
  missing = subprocess.run(["bash", str(SLURM / "finetune_array.sbatch"), "--dry-run", str(eids), "r"],
                           capture_output=True, text=True, env={**subprocess_env, "SLURM_ARRAY_TASK_ID": "3"})
  assert missing.returncode == 2 and "has no line 3" in missing.stderr


def test_submit_wrapper_chains_the_report(tmp_path, subprocess_env):
  eids = tmp_path / "eids.txt"
  eids.write_text("a\nb\n# c\nd\n")
  array, report = _run("submit_finetune_report.sh", "--dry-run", str(eids), "results/ndt1_mtm", env=subprocess_env)
  assert array.startswith("sbatch --parsable --array=1-3 --export=ALL,METHOD=finetune_ndt1_mtm ")
  assert array.endswith(f"finetune_array.sbatch {eids} results/ndt1_mtm")
  assert report.startswith("sbatch --dependency=afterany:JOBID ") and "python -m ibl_jax.report --results=results" in report
