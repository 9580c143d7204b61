"""The from-scratch recipe for small sessions (tens of trials): no pretrained encoder, regularised for the data.

  python -m ibl_jax.finetune --config=configs/finetune_scratch.py --config.data.sessions=/path/eids.txt

What differs from configs/finetune.py with `--config.pretrained=""`, each measured on three synthetic sessions of
42-52 training trials and 98-200 neurons (README, "Recipe and baseline"):
  * dropout 0.2 (attention 0.2, embedding 0.1): without it validation co-smoothing peaks near step 2000 and then
    falls while the validation loss stays flat (overfitting); 0.4 fits less on every session;
  * the loss averaged over target entries: the sum (pretraining's default) was below it on every session here;
  * the best checkpoint by co-smoothing on every validation neuron (a handful of trials: 64 neurons were too noisy
    to choose by), evaluated every 100 steps, stopping after 10 evaluations without a better one.
Pretrained and then fine-tuned (configs/finetune.py) is better still where a pretrained run exists.
"""

from ml_collections import config_dict

from ibl_jax.configs import config_module

_finetune = config_module("finetune")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = _finetune.get_config(arg)
  c.name = "finetune_scratch"
  c.pretrained = ""
  c.model.dropout = 0.2
  c.model.attention_dropout = 0.2
  c.model.embed_dropout = 0.1
  c.training.loss_reduction = "mean"
  c.training.num_steps = 3000
  c.training.eval_every = 100
  c.training.checkpoint_every = 100
  c.training.early_stop_patience = 10
  c.training.quick_cosmooth_neurons = 1024  # every neuron of the validation split
  return c
