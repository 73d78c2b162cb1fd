"""Five clients with 2 CIFAR-10 classes each, batch 20 (Table 2, cross-client setting).

    python -m mocosfl_jax.main --config=configs/cifar10_5clients.py --workdir=runs/cifar10_5 \
        --config.data.path=PATH_TO_CIFAR10

All 5 clients in every step (100 images per view), FedAvg every 50 steps,
500 steps per round, 200 rounds = 100,000 steps, cut layer 1, full width.
Runtime: see the README's benchmark table (step time x 100,000).
"""
from mocosfl_jax import config as base


def get_config():
  config = base.default_config()
  config.num_clients = 5
  config.noniid_ratio = 0.2
  config.cut_layer = 1
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.eval.every = 5
  config.eval.final_probes = True
  config.checkpoint.every = 5
  return base.auto_adjust(config)
