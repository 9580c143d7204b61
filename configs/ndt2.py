"""NDT2 (space-time patches, the MtM paper's STPatch) pretrained with multi-task masking on the synthetic corpus.

  python -m ibl_jax.train --config=configs/ndt2.py
  python -m ibl_jax.train --config=configs/ndt2.py:paper      # 128 neurons x 1 bin per patch, hidden 512, 5 layers
  python -m ibl_jax.evaluate --checkpoint=results/ndt2_mtm
  python -m ibl_jax.finetune --config=configs/finetune.py --config.pretrained=results/ndt2_mtm

Everything but the model section is NDT1's (configs/ndt1.py). The small model has 64 neurons per patch: the
synthetic corpus (N_max 160) makes 3 space patches x 100 bins = 300 tokens a trial, three times NDT1's.
"""

from ml_collections import config_dict

from ibl_jax import models
from ibl_jax.configs import config_module

_ndt1 = config_module("ndt1")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  size = arg or "small"
  c = _ndt1.get_config(size)
  c.name = "ndt2_mtm" if size == "small" else "ndt2_mtm_paper"
  c.model = models.family("ndt2").default_config(size)
  c.masking.token_bins = c.model.patch_bins  # random_token hides one patch
  c.masking.token_neurons = c.model.patch_neurons
  # Malloc (ibl_jax/hostmem.py): NDT1's paper-size one arena made NDT2's paper step slower and its heap larger
  # (6.6 -> 14.3 s a step, peak 4.3 -> 13.1 GB, docs/performance.md row 40); per-thread arenas kept whole made
  # the small model's training 30 -> 24 s for 400 steps (its 40 MiB temporaries no longer mapped and faulted in
  # every step; row 53) and changed nothing at paper size.
  c.mesh.reuse_freed_memory = "thread_arenas" if size == "small" else "off"
  if size == "small":
    c.training.num_steps = 1500
    # The CPU split of NDT1 (mesh.cpu_devices = 2): 4 devices of 4 trials ran faster before the attention kernel
    # (row 27) and slower after it (row 52: training loop 330-357 vs 398-405 trials/s). No effect on GPU/TPU.
  return c
