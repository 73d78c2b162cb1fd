"""The paper's headline setting: 1,000 clients, 2 CIFAR-10 classes each (Table 3).

    python -m mocosfl_jax.main --config=configs/cifar10_1000.py --workdir=runs/cifar10_1000 \
        --config.data.path=PATH_TO_CIFAR10

Batch 1 per client, 100 clients per step (sampling ratio 0.1), FedAvg every 50
steps (once per round), cut layer 1 (MocoSFL-1), full-width ResNet-18, V2 head,
200 x 10 = 2,000 rounds of 50 steps = 100,000 server steps. Paper: 86.46%
linear-probe accuracy at cut 1 (84.75% at cut 2, --config.cut_layer=2).
The data defaults to tfds (cifar10 in data_dir); a local copy works with
--config.data.source=npz (JPEG archives) or cifar_python (the python pickles).
Expected runtime: see the README's benchmark table (step time x 100,000).
"""
from mocosfl_jax import config as base


def get_config():
  config = base.default_config()
  config.num_clients = 1000
  config.noniid_ratio = 0.2
  config.cut_layer = 1
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.eval.every = 20
  config.eval.final_probes = True
  config.checkpoint.every = 20
  return base.auto_adjust(config)
