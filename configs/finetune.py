"""Fine-tune a pretrained run on new sessions (by default the synthetic corpus's held-out sessions).

  python -m ibl_jax.finetune --config=configs/finetune.py
  python -m ibl_jax.finetune --config=configs/finetune.py --config.pretrained=results/ndt1_temporal
  python -m ibl_jax.finetune --config=configs/finetune.py --config.pretrained=""      # from scratch
  python -m ibl_jax.finetune --config=configs/finetune.py --config.finetune.freeze_encoder=True

Model fields left unset (None) are taken from the pretrained checkpoint; an architecture field set to a
different value is an error. Dropouts and dtype may be overridden.
"""

from ml_collections import config_dict

from ibl_jax.configs import config_module

_ndt1 = config_module("ndt1")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = _ndt1.get_config(arg)
  c.name = "finetune"
  c.pretrained = "results/ndt1_mtm"  # a run directory (or a checkpoint step inside one); "" trains from scratch
  c.data.sessions = "data/synthetic/test_eids.txt"
  c.finetune = config_dict.ConfigDict()
  c.finetune.freeze_encoder = False  # True: only the per-session stitch rows and session token train
  # Every model field None = "as in the checkpoint" (placeholders keep `--config.model.x=...` overridable).
  c.model = config_dict.ConfigDict({k: config_dict.placeholder(type(v)) for k, v in c.model.items()})
  c.training.num_steps = 600
  # The recipe (README, "Fine-tuning"): the best checkpoint by validation co-smoothing, not the loss; evaluated
  # often, on 64 neuron slots (a small session's val split has 6-8 trials), and stopped when it stops improving.
  c.training.best_metric = "cosmooth_bps"
  c.training.eval_every = 50
  c.training.checkpoint_every = 50
  c.training.early_stop_patience = 4
  c.training.quick_cosmooth_neurons = 64
  c.training.log_every = 50
  return c
