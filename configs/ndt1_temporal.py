"""The paper's baseline: NDT1 pretrained with temporal masking only (no prompt token).

  python -m ibl_jax.train --config=configs/ndt1_temporal.py
  python -m ibl_jax.train --config=configs/ndt1_temporal.py:paper
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("configs_ndt1", Path(__file__).with_name("ndt1.py"))
_ndt1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ndt1)


def get_config(arg: str | None = None):
  c = _ndt1.get_config(arg)
  c.name = c.name.replace("mtm", "temporal")
  c.masking.scheme = "temporal"
  c.model.use_prompt = False  # one task: the prompt token carries nothing
  return c
