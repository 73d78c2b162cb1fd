"""TAResSFL stage 1: the "expert" client, pre-trained by the server operator (spec 6.4).

    python -m mocosfl_jax.main --config=configs/taressfl_expert.py --workdir=runs/taressfl_expert

One client (the server operator's), batch 128, lr 0.06 for client and
server, 200 rounds, the C4S2 bottleneck at cut 1 (--config.cut_layer=2 for
MocoSFL-3), trained with the ResSFL regulariser against a simulated
res_normN4C64 attacker (alpha 2, target SSIM 0.6), on CIFAR-100 (the
auxiliary set) plus 1% of CIFAR-10 (the target; --config.data.data_proportion
=0.005 or 0 for the paper's other columns: 0 trains on CIFAR-100 alone).
The kNN monitor, the probes and the attack use CIFAR-10, the target: its
whole training set is the kNN bank, as in every run. Stage 2
(configs/taressfl_cifar10.py) loads this run's best-kNN client and server.

Both sets come through tfds (downloaded on first use, needs tensorflow). Local
copies instead: --config.data.source=cifar_python
--config.data.path=PATH/cifar-10-batches-py --config.data.aux_source=cifar_python
--config.data.aux_path=PATH/cifar-100-python (or source npz with a folder of
train.npz and test.npz). Any source the data layer reads can be the auxiliary
set; offline with CIFAR-10 only, scikit-learn's digits stand in for
CIFAR-100: --config.data.aux_source=digits --config.data.aux_name=digits.

The batch mixes the two sets: data.aux_balance (on) repeats the target share
to the auxiliary set's size, so about half of each batch is target data, as
in the reference, whose step takes 128 target and 128 auxiliary images (256
rows a view; 128 with no target data): --config.batch_size=256 matches its
step size too (experiments/paper_tables.py's t4-expert rows do). Labels of
the auxiliary set never train anything; its images are normalised with the
target's statistics (the reference de-normalises them with the target's for
its attacker too, spec 9.19). Client learning rate per round, as the
reference's expert runner steps it (per epoch).

Expected (the reference's logs, spec 8.1): best kNN 65-70% on CIFAR-10 after
200 epochs of about 3 minutes each on a GPU; several logged expert runs
collapse late (loss 17.40), which the best-kNN model that stage 2 loads
hides.
"""
from mocosfl_jax import config as base


def get_config():
  config = base.default_config()
  config.seed = 1234
  config.num_clients = 1
  config.batch_size = 128
  config.cut_layer = 1
  config.num_rounds = 200
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.data_proportion = 0.01
  config.data.aux_source = 'tfds'
  config.data.aux_name = 'cifar100'
  config.data.aux_balance = True
  config.model.bottleneck = 'C4S2'
  config.optim.lr = 0.06
  config.privacy.ressfl_alpha = 2.0
  config.privacy.target_ssim = 0.6
  config.privacy.attacker = 'res_normN4C64'
  config.eval.every = 10
  config.eval.final_probes = True
  config.checkpoint.every = 10
  return config
