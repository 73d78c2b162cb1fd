"""A CPU-sized CIFAR-10 run: 10 clients with 2 classes each, narrow network.

    python -m mocosfl_jax.main --config=configs/cifar10_cpu.py --workdir=runs/cifar10_cpu \
        --config.data.path=../shared/data/cifar10

The real CIFAR-10 (here the JPEG copy in ../shared/data/cifar10, source 'npz'),
non-IID shards (2 classes per client), 10 clients x batch 10 per step, cut 1,
ResNet-18 at width 1/8, queue 4096, kNN on the full test set. Measured on 2 CPU
cores: 12 minutes of training, 18 minutes in all with
--config.eval.final_probes=True; kNN accuracy from 15.1% at initialisation to
30.5% (best 33.9%), linear probe 35.6%; other random streams give kNN 34-36.5%
(README, "Results").
"""
from mocosfl_jax import config as base


def get_config():
  config = base.default_config()
  config.num_clients = 10
  config.noniid_ratio = 0.2
  config.batch_size = 10
  config.cut_layer = 1
  config.steps_per_round = 100
  config.num_rounds = 20
  config.sync_every = 50
  config.data.source = 'npz'
  config.data.name = 'cifar10'
  config.data.path = '../shared/data/cifar10'
  config.model.width = 0.125
  config.optim.client_schedule = 'per_client_step'  # the reference's
  config.moco.queue_size = 4096
  config.eval.every = 2
  config.checkpoint.every = 2
  return config
