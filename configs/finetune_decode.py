"""Supervised decoding: a head on a pretrained encoder, fit to behaviour (docs/design.md §13).

  python -m ibl_jax.finetune --config=configs/finetune_decode.py                       # head + encoder train
  python -m ibl_jax.finetune --config=configs/finetune_decode.py --config.finetune.freeze_encoder=True
  python -m ibl_jax.finetune --config=configs/finetune_decode.py --config.model.decode_targets=choice

The default starts from the masked-modelling fine-tuning on the held-out sessions (configs/finetune.py, run
`results/finetune`), which has their stitching; a frozen encoder needs that (it trains the head alone). Targets:
choice, block (classes), wheel-speed, whisker-motion-energy (per-bin traces), any subset, comma-separated.
"""

from ml_collections import config_dict

from ibl_jax.configs import config_module

_finetune = config_module("finetune")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = _finetune.get_config(arg)
  c.name = "finetune_decode"
  c.pretrained = "results/finetune"
  c.model.decode_targets = "choice,block,wheel-speed,whisker-motion-energy"
  c.training.objective = "supervised"
  c.training.decode_prompt = "neuron"  # the prompt token the head reads under: neuron | causal | ...
  c.training.best_metric = "decode_score"  # mean over targets of the balanced accuracy / R² on validation
  c.training.num_steps = 400
  c.training.learning_rate = 1e-3
  c.eval.tasks = "behaviour"  # the frozen-rates linear decoders beside the head's own scores (task "supervised")
  c.eval.figures = False
  return c
