"""The step commands' restart with glibc's malloc set to reuse freed memory (ibl_jax/hostmem.py)."""

import pytest

from ibl_jax import hostmem

OURS = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def test_tunables_are_added_to_what_the_environment_already_sets():
  assert hostmem.tunables_value("") == OURS
  # the user's own value of one of ours stays; other tunables are kept
  assert hostmem.tunables_value("glibc.malloc.arena_max=4:glibc.pthread.rseq=0") == (
      "glibc.malloc.arena_max=4:glibc.pthread.rseq=0:glibc.malloc.mmap_max=0:"
      "glibc.malloc.trim_threshold=2147483647")
  assert hostmem.tunables_active({"GLIBC_TUNABLES": OURS})
  assert not hostmem.tunables_active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
  assert not hostmem.tunables_active({})


@pytest.mark.parametrize("argv, command", [
    (["python", "-m", "ibl_jax.train", "--config=configs/ndt1.py"], "ibl_jax.train"),
    (["python3", "-u", "-X", "dev", "-m", "ibl_jax.bench", "--what=torch"], "ibl_jax.bench"),
    (["python", "-mibl_jax.evaluate", "run"], "ibl_jax.evaluate"),
    (["/venv/bin/python", "/venv/bin/ibl-jax-finetune", "--config=x"], "/venv/bin/ibl-jax-finetune"),
    (["python", "-m", "ibl_jax.data", "info"], None),  # no steps: malloc left alone
    (["python", "-m", "pytest", "-m", "ibl_jax.train"], None),  # pytest's own -m
    (["python", "-c", "import ibl_jax"], None),
    (["python", "script.py", "-m", "ibl_jax.train"], None),
    (["python"], None),
])
def test_step_command_reads_the_interpreter_s_own_arguments(argv, command):
  assert hostmem.step_command(argv) == command


def test_restart_only_for_a_step_command_on_glibc_linux_once_and_not_when_turned_off():
  argv = ["python", "-m", "ibl_jax.train"]
  assert hostmem.should_restart(argv, {}, "Linux", "glibc")
  assert not hostmem.should_restart(["python", "-m", "ibl_jax.report"], {}, "Linux", "glibc")
  assert not hostmem.should_restart(argv, {}, "Darwin", "")
  assert not hostmem.should_restart(argv, {}, "Linux", "musl")
  assert not hostmem.should_restart(argv, {}, "Linux", "glibc", accelerator=True)  # temporaries on the device
  assert not hostmem.should_restart(argv, {"GLIBC_TUNABLES": OURS}, "Linux", "glibc")  # already set
  assert not hostmem.should_restart(argv, {"IBL_JAX_MALLOC_RESTARTED": "1"}, "Linux", "glibc")  # never twice
  assert not hostmem.should_restart(argv, {"IBL_JAX_KEEP_FREED_MEMORY": "0"}, "Linux", "glibc")


def test_only_ndt1_at_paper_size_restarts():
  from conftest import load_config_module  # pylint: disable=import-outside-toplevel
  for name in ("ndt1", "ndt2"):
    module = load_config_module(name)
    assert not module.get_config().mesh.reuse_freed_memory  # small: the one arena's lock costs more
  assert load_config_module("ndt1").get_config("paper").mesh.reuse_freed_memory
  assert not load_config_module("ndt2").get_config("paper").mesh.reuse_freed_memory  # measured slower
