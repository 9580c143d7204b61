"""The step commands' restart with glibc's malloc set to reuse freed memory (ibl_jax/hostmem.py)."""

import pytest

from ibl_jax import hostmem
from ibl_jax.errors import UserError

OURS = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"
THREAD_ARENAS = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=2147483647:glibc.malloc.top_pad=67108864"


def test_tunables_are_added_to_what_the_environment_already_sets():
  assert hostmem.tunables_value("") == OURS
  # the user's own value of one of ours stays; other tunables are kept
  assert hostmem.tunables_value("glibc.malloc.arena_max=4:glibc.pthread.rseq=0") == (
      "glibc.malloc.arena_max=4:glibc.pthread.rseq=0:glibc.malloc.mmap_max=0:"
      "glibc.malloc.trim_threshold=2147483647")
  assert hostmem.tunables_value("", "thread_arenas") == THREAD_ARENAS
  assert hostmem.active_mode({"GLIBC_TUNABLES": OURS}) == "one_arena"
  assert hostmem.active_mode({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:" + THREAD_ARENAS}) == "thread_arenas"
  assert hostmem.active_mode({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}) is None
  assert hostmem.active_mode({}) is None


@pytest.mark.parametrize("setting, mode", [(True, "one_arena"), (False, None), (None, None), ("true", "one_arena"),
                                           ("false", None), ("off", None), ("one_arena", "one_arena"),
                                           ("Thread_Arenas", "thread_arenas")])
def test_mode_of_reads_the_config_value_and_runs_saved_before_the_modes(setting, mode):
  assert hostmem.mode_of(setting) == mode


def test_mode_of_rejects_an_unknown_mode_naming_the_choices():
  with pytest.raises(UserError, match="reuse_freed_memory='one-arena'.*one_arena, thread_arenas or false"):
    hostmem.mode_of("one-arena")


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
  assert hostmem.should_restart(argv, {"GLIBC_TUNABLES": OURS}, "Linux", "glibc", mode="thread_arenas")
  assert not hostmem.should_restart(argv, {"GLIBC_TUNABLES": THREAD_ARENAS}, "Linux", "glibc", mode="thread_arenas")
  assert not hostmem.should_restart(argv, {"IBL_JAX_MALLOC_RESTARTED": "1"}, "Linux", "glibc")  # never twice
  assert not hostmem.should_restart(argv, {"IBL_JAX_KEEP_FREED_MEMORY": "0"}, "Linux", "glibc")


def test_each_config_restarts_in_the_mode_measured_for_it():
  from conftest import load_config_module  # pylint: disable=import-outside-toplevel
  mode = lambda name, size=None: hostmem.mode_of(load_config_module(name).get_config(size).mesh.reuse_freed_memory)
  assert mode("ndt1") is None  # small: the one arena's lock costs more, its temporaries are reused anyway
  assert mode("ndt1", "paper") == "one_arena"  # 246 MiB temporaries a device
  assert mode("ndt2") == "thread_arenas"  # 40 MiB temporaries a device
  assert mode("ndt2", "paper") is None  # one arena measured slower, thread arenas no faster
