"""The default configuration and the reference's ``auto_adjust`` rules.

Experiment configs in ``configs/`` start from :func:`default_config` and
override a few fields; every field is documented here once. A run starts from
:func:`resolved`, which applies ``auto_adjust`` after the command line's
overrides, so ``--config.num_clients=200`` re-derives the schedule.
"""
from __future__ import annotations

import ml_collections

# The reference's rules produce its CIFAR-10/100 schedules (spec 3.2): a FedAvg
# every 50 steps needs the number of steps in a pass, which depends on the
# training set's size; the config is resolved before any data is loaded.
AUTO_ADJUST_TRAIN_SAMPLES = 50_000
AUTO_ADJUST_DATASETS = ('cifar10', 'cifar100')


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default. Defaults follow the reference (spec 3.1, 10), except the seed."""
  c = ml_collections.ConfigDict()
  c.seed = 0                   # fixes init, partition, pool draws, data order and augmentation
  c.num_clients = 100          # N: clients that exist (each has its own state)
  c.client_sample_ratio = 1.0  # fraction of clients drawn into each round's pool, in (0, 1]
  c.batch_size = 1             # per client and step; the server batch is pool size x batch_size
  c.cut_layer = 1              # modules on the client (1 = MocoSFL-1, 2 = MocoSFL-3, 3 = MocoSFL-5)
  c.noniid_ratio = 1.0         # 1.0 = IID; m = noniid_ratio x classes per client otherwise
  c.num_rounds = 200           # rounds (the reference's epochs); the pool is drawn once per round.
                               # Used as given: the reference multiplies its epochs by
                               # int(1 / client_sample_ratio); here only auto_adjust does (spec 3.1)
  c.steps_per_round = 0        # server steps per round; 0 = a client's samples // batch_size
  c.sync_every = 50            # FedAvg every this many steps, and always after a round's last step
  c.round_impl = 'auto'        # scan (a round is one program) | loop (a program per step) | auto
  c.auto_adjust = False        # derive batch_size, client_sample_ratio, sync_every and num_rounds
                               # (x 1 / ratio) from num_clients when the run starts (spec 3.2)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'digits'     # digits | npz | cifar_python | image_folder | tfds
  c.data.name = 'digits'       # dataset name: the tfds builder and the normalisation statistics
                               # (the reference's for cifar10, cifar100, svhn_cropped, stl10 and
                               # digits; the training set's own for any other name)
  c.data.path = ''             # file or folder for the local sources
  c.data.data_dir = ''         # tfds data_dir ('' = the tfds default)
  c.data.download = True       # tfds: download and prepare data.name when data_dir lacks it
  c.data.cache_dir = ''        # decoded-array cache ('' = ~/.cache/mocosfl_jax)
  c.data.partition = 'auto'    # auto (iid, or shards when noniid_ratio < 1) | iid | shards | dirichlet
  c.data.dirichlet_alpha = 0.5  # label-skew concentration of the dirichlet partition
  c.data.data_proportion = 1.0  # keep this random fraction of the training set first
  c.data.hetero = ''           # '' or the reference's "A_B|C|D_E" heterogeneous-client string
  # An auxiliary training set (TAResSFL's expert, spec 6.4): its training split joins the target's
  # kept data_proportion (which may then be 0); the kNN monitor, the probes and the attack keep
  # using the target's data. The fields mirror source, name, path and data_dir above.
  c.data.aux_source = ''       # '' (none) or a data.source value
  c.data.aux_name = ''         # as data.name (its normalisation is not used: the target's is)
  c.data.aux_path = ''
  c.data.aux_data_dir = ''
  c.data.aux_balance = True    # repeat each client's target share to about its aux share's size,
                               # so batches mix the two about 50/50 as the reference's do

  c.model = ml_collections.ConfigDict()
  c.model.width = 1.0          # channel multiplier (1.0 = the paper's ResNet-18); every stage needs
                               # a multiple of 4 channels: a multiple of 1/16 such as 0.125
  c.model.depth = 18           # ResNet depth: 18 (the paper's), 34 (the reference's ResNet34) or 10
                               # (one block a stage; not in the reference; quick studies, tests)
  c.model.image_size = 32      # input resolution: images are resized to it when loaded, for
                               # training and evaluation alike, and crops to it when augmented
  c.model.weight_standardization = True  # WS on block convs (the stem always has it)
  c.model.client_impl = 'auto'  # auto | vmap | map | matmul: how the pool's clients run (benchmark.py)
  c.model.dtype = 'float32'     # float32 | bfloat16: of activations and convolutions; parameters,
                               # optimiser, losses and GroupNorm statistics stay float32
  c.model.bottleneck = ''      # '' (off) or [K<k>]C<c>[S<s>][noRELU]: a conv pair at the cut that
                               # compresses the smashed data to c channels and H/s x W/s (spec 1.5;
                               # C4S2 in the TAResSFL scripts)

  # Edge clients (python -m mocosfl_jax.serve): how long a step or a sync waits
  # for their replies before it drops the missing ones, and the largest reply.
  c.edge = ml_collections.ConfigDict()
  c.edge.timeout_s = 30.0
  c.edge.max_message_mb = 64

  c.moco = ml_collections.ConfigDict()
  c.moco.version = 'V2'        # head: V1 | smallV2 | V2 | largeV2
  c.moco.loss = 'auto'         # auto (asymmetric for V1, else symmetric) | symmetric | asymmetric
  c.moco.augmentation = 'auto'  # auto (mocov1 for V1, else mocov2) | mocov1 | mocov2 | none (fixed views)
  c.moco.crop_scale_min = 0.08  # smallest crop area fraction (reference 0.08; larger for tiny images)
  c.moco.queue_size = 6000     # K keys shared by all clients (K // N per client without sharing)
  c.moco.temperature = 0.1     # InfoNCE temperature
  c.moco.ema_decay = 0.99      # tau of the client and server EMA models (hard-coded in the reference)
  c.moco.ema_dtype = 'float32'  # float32 | bfloat16: storage of the per-client EMA client models
                               # (updated in float32, stored with stochastic rounding: a sixth
                               # less per-client state; README "bfloat16 EMA models")
  c.moco.feature_sharing = True  # one shared queue; False = one queue per client

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.06            # server learning rate (all reference scripts pass 0.06)
  c.optim.client_lr = -1.0     # client learning rate; negative = same as lr. A client rate of 0
                               # = frozen clients (TAResSFL): no client backward, update or FedAvg
  c.optim.momentum = 0.9       # SGD momentum, server and clients
  c.optim.weight_decay = 5e-4  # coupled (PyTorch) weight decay on every parameter
  c.optim.schedule = 'auto'    # auto (multistep for V1, else cosine) | cosine | multistep
  c.optim.client_schedule = 'per_round'  # per_round (the server's per-epoch cosine) | per_client_step
                                        # (the reference's: its cosine stepped per client step)

  c.fedavg = ml_collections.ConfigDict()
  c.fedavg.average_ema = False  # also average the EMA client models (the reference does not)
  c.fedavg.weighting = 'uniform'  # uniform (the reference) | data_size

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10            # kNN monitor every this many rounds (and at init and the end)
  c.eval.knn_k = 200           # neighbours
  c.eval.knn_temperature = 0.1  # neighbour weight exp(sim / T)
  c.eval.batch_size = 500      # images per forward pass when computing features
  c.eval.final_probes = False  # run the linear and MLP probes at the end of training
  c.eval.probe_epochs = 100    # epochs of the final probes

  # The model-inversion attack (spec 6.1; python -m mocosfl_jax.attack).
  c.privacy = ml_collections.ConfigDict()
  c.privacy.attack_at_end = False  # attack the final client when training ends (attack.json and
                                   # attack.png in the workdir, the metrics in summary.json)
  c.privacy.attack_data_fraction = 0.01  # the attacker's (smashed, image) pairs: this seeded
                                         # fraction of the training set (at least 2 images)
  c.privacy.attack_val_fraction = 0.1  # of those pairs held out: the epoch of lowest MSE is kept
  c.privacy.attack_epochs = 50       # decoder training epochs
  c.privacy.attack_batch_size = 32   # decoder training batch
  c.privacy.attack_lr = 1e-3         # Adam's learning rate
  c.privacy.attack_channels = 64     # the decoder's width (res_normN4C64: 64)
  c.privacy.attack_test_images = 128  # the seeded test images the attack is scored on
  c.privacy.attack_seed = 123        # draws the pairs, the hold-out and the test images and
                                     # initialises the decoder (the reference's shuffle seed)
  # ResSFL's attacker-aware training (spec 6.3): every client trains its own simulated attacker
  # and descends its contrastive loss + ressfl_alpha x max(SSIM - target_ssim, 0).
  c.privacy.ressfl_alpha = 0.0       # the regulariser's weight; 0 = off (no attackers)
  c.privacy.target_ssim = 0.6        # > 0: only SSIM above it is penalised; <= 0: alpha x SSIM
  c.privacy.attacker = 'custom'      # custom (the reference's default) | res_normN4C64 (BatchNorm
                                     # from batch_size 20, GroupNorm + WS below, as the reference)
  c.privacy.attacker_channels = 64   # res_normN4C64's width
  c.privacy.attacker_lr = 1e-3       # the attackers' Adam rate (constant, as in run_sflmoco)

  # Start from another run's weights (TAResSFL stage 2, spec 6.4): only when a run starts at
  # round 0; a resumed run restores its own checkpoint.
  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = ''     # '' (off) or a run's workdir: its client 0 goes into every client's
                               # online and EMA model (the reference leaves the EMA random, 9.18)
  c.init.checkpoint = 'latest'  # latest | best (the best-kNN model) | a saved round
  c.init.load_server = False   # also the server and its head (online and EMA; the reference's
                               # --load_server)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10      # rounds between checkpoints (and one at the end)
  c.checkpoint.keep = 3        # checkpoints kept

  # The devices a run's clients are split over (README "Many devices"); num_clients and the
  # pool must divide by their count. Changing it does not change the numbers, so a run may
  # resume on another count.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.devices = 0           # local devices of the 1-D 'clients' mesh; 0 = all of them

  c.log_every = 1              # rounds between metrics.jsonl records
  return c


def auto_adjust(config: ml_collections.ConfigDict,
                num_train_samples: int = AUTO_ADJUST_TRAIN_SAMPLES) -> ml_collections.ConfigDict:
  """The reference's ``--auto_adjust`` (spec 3.2): about 100 images per view per step.

  batch 100 // N for N <= 50 (else 1); a FedAvg every 50 steps; 100 clients per
  step (ratio 100 / N for N >= 200); ``num_rounds`` (the reference's epochs)
  multiplied by 1 / ratio. Changes ``config`` in place and returns it.
  """
  n = config.num_clients
  config.batch_size = 100 // n if n <= 50 else 1
  config.client_sample_ratio = 1.0 / (n // 100) if n >= 200 else 1.0
  steps_per_round = num_train_samples // n // config.batch_size
  avg_freq = 1000 // (config.batch_size * n) if n <= 1000 else 1
  config.sync_every = max(steps_per_round // max(avg_freq, 1), 1)
  config.num_rounds = config.num_rounds * int(round(1.0 / config.client_sample_ratio))
  return config


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``auto_adjust`` applied, as a run uses it.

  The copy holds the derived values with ``auto_adjust`` off, so resolving it
  again changes nothing (a checkpoint stores it and a resume compares against it).
  """
  if isinstance(config, ml_collections.FrozenConfigDict):
    config = config.as_configdict()
  config = config.copy_and_resolve_references()
  if config.auto_adjust:
    # Rounded as partition.make_partition rounds the kept fraction.
    auto_adjust(config, int(AUTO_ADJUST_TRAIN_SAMPLES * config.data.data_proportion + 1e-9))
    config.auto_adjust = False
  return config


def replaced_by_auto_adjust(config: ml_collections.ConfigDict) -> list[str]:
  """``field=value`` for each field set away from its default that auto_adjust overwrites."""
  if not config.auto_adjust:
    return []
  run, defaults = resolved(config), default_config()
  return [f'{name}={config[name]!r}' for name in ('batch_size', 'client_sample_ratio', 'sync_every')
          if config[name] != defaults[name] and config[name] != run[name]]
