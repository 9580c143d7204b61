"""ibl_jax: a JAX/Flax re-implementation of the IBL multi-task-masking (MtM) foundation model for spiking data."""

__version__ = "0.1.0"

# `python -m ibl_jax.train` (and the other commands that run steps) restarts once, before any import, with glibc's
# malloc set to reuse freed memory: XLA:CPU's per-step temporaries stop costing page faults (hostmem.py).
from ibl_jax import hostmem as _hostmem  # pylint: disable=g-import-not-at-top,wrong-import-position

_hostmem.restart_with_tunables()
