"""TAResSFL stage 2: MocoSFL with frozen, attack-resistant clients (spec 6.4, paper Table 4).

    python -m mocosfl_jax.main --config=configs/taressfl_cifar10.py --workdir=runs/taressfl_cifar10 \
        --config.init.from_workdir=runs/taressfl_expert

100 CIFAR-10 clients with 2 classes each (--config.noniid_ratio=1.0 for IID;
the reference's scripts run both), auto_adjust's schedule (batch 1, all 100
clients a step, FedAvg period 50 steps, 200 rounds of 500 steps), the C4S2
bottleneck at cut 1 (--config.cut_layer=2 for MocoSFL-3, with an expert of
that cut). Every client starts from the expert's best-kNN client
(configs/taressfl_expert.py, stage 1; init.from_workdir is required: left
empty, the run stops with one line naming it), the server from the expert's
server, and the EMA models from the same weights (the reference leaves them
random, spec 9.18). optim.client_lr=0 freezes the clients: the step runs
their forward passes only (no backward, no update), no FedAvg runs, and the
communication count has smashed data only going up (the start-of-run table
and summary.json say so; python -m mocosfl_jax.overhead with this config
prints it all). Server learning rate 0.001, as in the reference's script.
The model-inversion attack on the final client runs at the end
(attack.json, attack.png). Local data instead of tfds: as
configs/cifar10_1000.py says.

Expected (paper Table 4, 3 seeds): about 80-81% linear-probe accuracy at
attack MSE 0.033-0.039 (cut 1), 80.5-83% at 0.035-0.045 (cut 2).
"""
from mocosfl_jax import config as base


def get_config():
  config = base.default_config()
  config.seed = 1234
  config.num_clients = 100
  config.noniid_ratio = 0.2
  config.cut_layer = 1
  config.num_rounds = 200
  config.auto_adjust = True
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.model.bottleneck = 'C4S2'
  config.optim.lr = 0.001
  config.optim.client_lr = 0.0
  config.init.from_workdir = ''  # required: the expert's workdir (stage 1)
  config.init.checkpoint = 'best'
  config.init.load_server = True
  config.privacy.attack_at_end = True
  config.eval.every = 20
  config.eval.final_probes = True
  config.checkpoint.every = 20
  return config
