"""The paper's baseline: NDT1 pretrained with temporal masking only (no prompt token).

  python -m ibl_jax.train --config=configs/ndt1_temporal.py
  python -m ibl_jax.train --config=configs/ndt1_temporal.py:paper
"""

from ibl_jax.configs import config_module

_ndt1 = config_module("ndt1")


def get_config(arg: str | None = None):
  c = _ndt1.get_config(arg)
  c.name = c.name.replace("mtm", "temporal")
  c.masking.scheme = "temporal"
  c.model.use_prompt = False  # one task: the prompt token carries nothing
  return c
