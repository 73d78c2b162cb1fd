"""The MocoSFL run: data, partition, state, rounds, evaluation, outputs.

This is the only module that knows the order of things. Everything it calls is
a pure function or a small object from the library below it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import pathlib
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import distributed
from mocosfl_jax import init_from
from mocosfl_jax import metrics as metrics_lib
from mocosfl_jax import overhead
from mocosfl_jax import sharding
from mocosfl_jax.data import augment, partition, sources
from mocosfl_jax.evaluation import features, final
from mocosfl_jax.models import split
from mocosfl_jax.privacy import attack as privacy_attack
from mocosfl_jax.privacy import ressfl
from mocosfl_jax.sfl import moco, optim, rounds, state as state_lib, step as step_lib

log = logging.getLogger('mocosfl_jax')


# ---------------------------------------------------------------------------
# Building the experiment from a config
# ---------------------------------------------------------------------------

def resolve_client_impl(impl: str) -> str:
  """'auto': clients as batched matmuls ('matmul') on every backend.

  On CPU a grouped convolution ('vmap') is about 12x slower than either
  alternative (design/performance-notes.md); 'matmul' is a little faster than
  a native conv per client ('map') at cut 1 and about 2x faster at cut 2
  (README "Performance"). On GPUs grouped convolutions are a known slow path
  too.
  """
  return 'matmul' if impl == 'auto' else impl


def resolve_round_impl(impl: str, backend: str | None = None) -> str:
  """'auto': one program per round ('scan') except on CPU, where XLA compiles the
  step inside a loop body about 10x slower, so steps are dispatched one by one."""
  if impl != 'auto':
    return impl
  return 'loop' if (backend or jax.default_backend()) == 'cpu' else 'scan'


@dataclasses.dataclass
class Experiment:
  """Everything a run derives from its config, before any state exists."""
  config: ml_collections.ConfigDict
  train: sources.Split
  test: sources.Split
  partition: object
  client_net: object
  server_net: object
  server_tx: object
  client_tx: object
  run_round: object  # compiled (state, data, key) -> (state, metrics)
  embed: object      # jitted feature extractor
  steps_per_round: int
  pool_size: int
  client_impl: str
  aux: sources.Split | None = None  # data.aux_*'s training split, whose ids follow train's
  layout: sharding.Layout | None = None  # the mesh's shardings; None on one device
  edge: object = None  # the edge clients' exchange (mocosfl_jax/serve.py), or None

  def init_state(self, key: jax.Array) -> state_lib.SimState:
    c = self.config
    init = functools.partial(
        state_lib.init_state, client_net=self.client_net, server_net=self.server_net,
        server_tx=self.server_tx, client_tx=self.client_tx, num_clients=c.num_clients,
        image_size=c.model.image_size, queue_size=c.moco.queue_size,
        feature_sharing=c.moco.feature_sharing, ema_dtype=c.moco.ema_dtype)
    # ResSFL's attackers, when it is on, are per-client state too.
    with_attackers = lambda key: ressfl.add_attackers(init(key), key, c, self.client_net)
    # Compiled: run op by op, initialisation takes longer than compiling it.
    return jax.jit(with_attackers)(key)

  def client_data(self) -> rounds.ClientData:
    """The training data on the device, or split with the clients over the mesh.

    On a mesh, a process reads only the images of its devices' clients
    (sharding.Layout.client_images), and the table addresses them client by
    client: the same images as on one device, so the same numbers.
    """
    table, counts = partition.padded(self.partition.client_indices)
    if self.layout is not None:
      devices = self.layout.mesh.size
      log.info('training images split with the clients over %d devices: %d rows a device, '
               '%.0f%% of them padding (clients filled up to the largest share)', devices,
               table.size // devices, 100 * (1 - counts.sum() / table.size))
      images = self.layout.client_images(table, self.read_images, self.train.images.shape[1:])
      return rounds.ClientData(images, *self.layout.replicate(
          (sharding.client_major(table), counts)))
    images = self.train.images
    if self.aux is not None:
      images = np.concatenate([images, self.aux.images])
    return rounds.ClientData(jnp.asarray(images), jnp.asarray(table), jnp.asarray(counts))

  def read_images(self, ids: np.ndarray) -> np.ndarray:
    """The training table's images ``ids``: the target's, then the auxiliary set's."""
    if self.aux is None:
      return np.asarray(self.train.images[ids])
    own = ids < len(self.train)
    images = np.empty((len(ids),) + self.train.images.shape[1:], np.uint8)
    images[own] = self.train.images[ids[own]]
    images[~own] = self.aux.images[ids[~own] - len(self.train)]
    return images

  def bank_images(self, data: rounds.ClientData) -> jax.Array | None:
    """The kNN monitor's bank: the target's whole training set, without the auxiliary set.

    On a mesh the training images lie client by client, so the bank is read
    apart, by process 0 alone: only it evaluates (:func:`knn_on_primary`).
    """
    if self.layout is not None:
      return jnp.asarray(self.train.images) if distributed.is_primary() else None
    return data.images if self.aux is None else data.images[:len(self.train)]

  def test_images(self) -> jax.Array | None:
    """The test set on the device of the process that evaluates; None on the others."""
    return jnp.asarray(self.test.images) if distributed.is_primary() else None

  def table_labels(self) -> np.ndarray:
    """The labels of the training table's ids: the auxiliary set's after the target's classes."""
    if self.aux is None:
      return self.train.labels
    return np.concatenate([self.train.labels, self.aux.labels + self.train.num_classes])


def steps_per_round(config, counts: np.ndarray, batch_multiplier: np.ndarray) -> int:
  """Configured, or one pass over an average client's data.

  Client i passes over its data in counts[i] / (batch_size * batch_multiplier[i])
  steps; a round takes the mean over clients, as floor(mean(counts /
  batch_multiplier)) // batch_size, which without data.hetero is an average
  client's samples // batch_size. A client's walk through its data goes on
  across passes and rounds (rounds.sample_batches), so clients with longer
  passes go on where they stopped the next time they are sampled.
  """
  return config.steps_per_round or max(
      int(np.mean(counts / batch_multiplier)) // config.batch_size, 1)


def pool_size(config) -> int:
  return max(int(config.client_sample_ratio * config.num_clients), 1)


def build(config: ml_collections.ConfigDict, edge=None) -> Experiment:
  """Loads data, partitions it and builds models, optimisers and compiled functions.

  ``edge`` (mocosfl_jax/serve.py) plays some clients from edge-client processes:
  ``edge.attach(exp)`` gives it the experiment, and ``rounds.make_round`` its
  ``exchange``.
  """
  c = config
  # Process 0 decodes a dataset that is not in the cache yet, once; the others
  # then find it there, if the cache is shared, instead of writing it too.
  with distributed.primary_first('mocosfl_data_cached'):
    train = sources.load_split(c.data, 'train', c.model.image_size)
    test = sources.load_split(c.data, 'test', c.model.image_size)
    aux = None
    if c.data.aux_source:
      aux = sources.load_split(sources.aux_config(c.data), 'train', c.model.image_size)
  if aux is not None:
    part = partition.make_partition_with_aux(train.labels, train.num_classes, c.num_clients,
                                             c.noniid_ratio, c.data, c.seed, len(aux))
  else:
    part = partition.make_partition(train.labels, train.num_classes, c.num_clients,
                                    c.noniid_ratio, c.data, c.seed)
  _, counts = partition.padded(part.client_indices)
  steps = steps_per_round(c, counts, part.batch_multiplier)
  pool = pool_size(c)
  layout = sharding.layout(c, pool)

  client_impl = resolve_client_impl(c.model.client_impl)
  client_net, server_net = split.build(c, as_matmul=client_impl == 'matmul')
  server_tx = optim.sgd(c.optim.momentum, c.optim.weight_decay)
  client_tx = optim.sgd(c.optim.momentum, c.optim.weight_decay)
  server_lr, client_lr = optim.learning_rates(c)

  # The target's statistics normalise the auxiliary images too: one network
  # input distribution (the reference de-normalises them with the target's
  # statistics as well, spec 9.19).
  mean, std = sources.normalization(c.data.name, train.images)
  frozen = optim.frozen_clients(c.optim)
  pair_augment = augment.make_pair_augment(augment.resolve_version(c.moco), mean, std,
                                           c.model.image_size, (c.moco.crop_scale_min, 1.0))
  train_step = step_lib.make_train_step(
      client_net, server_net, server_tx, client_tx, pair_augment,
      temperature=c.moco.temperature, ema_decay=c.moco.ema_decay,
      client_impl='map' if client_impl == 'map' else 'vmap',
      server_lr=server_lr, client_lr=client_lr,
      server_batch=rounds.most_rows(c.batch_size * part.batch_multiplier, pool),
      symmetric=moco.is_symmetric(c.moco.loss, c.moco.version), frozen_clients=frozen,
      ressfl=ressfl.from_config(c, mean, std))
  run_round = rounds.make_round(
      train_step, num_clients=c.num_clients, pool_size=pool, steps=steps,
      batch_size=c.batch_size, sync_every=c.sync_every, average_ema=c.fedavg.average_ema,
      weighting=c.fedavg.weighting, one_program=resolve_round_impl(c.round_impl) == 'scan',
      batch_multiplier=part.batch_multiplier,
      passes=rounds.passes_needed(counts, c.batch_size * np.asarray(part.batch_multiplier),
                                  steps), frozen_clients=frozen, layout=layout,
      exchange=edge)
  embed = features.make_embed(client_net, server_net, mean, std, c.eval.batch_size)
  return Experiment(c, train, test, part, client_net, server_net, server_tx, client_tx,
                    run_round, embed, steps, pool, client_impl, aux, layout, edge)


# ---------------------------------------------------------------------------
# Evaluation during training
# ---------------------------------------------------------------------------

def evaluate_knn(exp: Experiment, state: state_lib.SimState, bank_images, test_images) -> float:
  """kNN accuracy (%) of client 0's online model with the online server and head (spec 5.1).

  After every round's closing FedAvg all clients hold the same online model.
  """
  return knn_on_primary(exp, mesh_model(exp, state), bank_images, test_images)


def knn_on_primary(exp: Experiment, shared, bank_images, test_images) -> float:
  """The kNN accuracy of ``shared`` (:func:`mesh_model`'s), on every process.

  Process 0 computes it and tells the others, which hold no bank or test set
  (:meth:`Experiment.bank_images`); they need it only to agree on the best
  model, whose choice is process 0's anyway (``distributed.agreed``).
  """
  accuracy = (final.knn_accuracy(exp, local_model(exp, shared), bank_images, test_images)
              if distributed.is_primary() else 0.0)
  return distributed.from_primary(accuracy)


def mesh_model(exp: Experiment, state: state_lib.SimState):
  """``final.eval_model``'s model, replicated over the mesh if there is one.

  What the best-kNN copy saves: orbax writes a replicated array once, for
  every process.
  """
  if exp.layout is None:
    return final.eval_model(state)
  return jax.jit(final.eval_model, out_shardings=exp.layout.replicated)(state)


def local_model(exp: Experiment, model):
  """``mesh_model``'s model on one device of this process: evaluation is not
  sharded, and replicated over a mesh it would run once on every device."""
  return model if exp.layout is None else exp.layout.local(model)


def eval_model(exp: Experiment, state: state_lib.SimState):
  """The model that evaluation uses, on one device of this process."""
  return local_model(exp, mesh_model(exp, state))


def on_device(abstract_tree):
  """``abstract_tree``'s shapes and dtypes on this process's first device, as orbax restores them."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      abstract_tree)


def best_trained_knn(knn_history: list[tuple[int, float]], default: float = -math.inf) -> float:
  """The best kNN accuracy of a trained model (round 1 or later), ``default`` if none.

  The reference selects among trained models only, so the initial model's
  accuracy never counts as the best.
  """
  return max((a for r, a in knn_history if r > 0), default=default)


def final_probes(exp: Experiment, state: state_lib.SimState, best: final.BestKnnModel,
                 knn_history: list[tuple[int, float]], abstract_state, bank_images,
                 test_images) -> dict:
  """The probes of the final model and of the best-kNN model (spec 4.9, 5.2, 5.3).

  The best-kNN model is left out, with a warning, when the workdir no longer
  holds the model of the best kNN accuracy in ``knn_history``: then the
  reference's numbers come from the final model, as the result says.
  """
  c = exp.config
  models = {'final': (f'final model (round {c.num_rounds})', c.num_rounds,
                      eval_model(exp, state))}
  best_recorded = best_trained_knn(knn_history)
  try:
    restored = best.restore(on_device(jax.eval_shape(final.eval_model, abstract_state)), c)
  except checkpoint.CheckpointError as e:
    log.warning('%s', e)
    restored = None
  if restored is None or restored[1]['knn_accuracy'] < best_recorded:
    log.warning('the best-kNN model (%.2f%%) is not in %s: probing the final model only',
                best_recorded, best.directory)
  else:
    model, meta = restored
    models['best_knn'] = (f'best-kNN model (round {meta["round"]}, kNN '
                          f'{meta["knn_accuracy"]:.2f}%)', meta['round'], model)
  if not distributed.is_primary():
    return {}  # the probes are process 0's, which writes the summary
  return final.final_evaluation(exp, models, final.probe_key(c.seed), c.eval.probe_epochs,
                                bank_images, test_images)


# ---------------------------------------------------------------------------
# The workdir's earlier results
# ---------------------------------------------------------------------------

# The files of a run's results, other than TensorBoard's event files and the
# best-kNN model: the metrics, the summary, evaluate's evaluation.json,
# plot's default PNG and the attack's files. partition.json is not one: every
# start rewrites it from the config.
RESULT_FILES = (metrics_lib.METRICS_FILENAME, 'summary.json', 'evaluation.json',
                'metrics.png', privacy_attack.RESULT_FILENAME, privacy_attack.IMAGE_FILENAME)


def earlier_results(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """The results of an earlier run in ``workdir``, which a run from round 0 would overwrite."""
  workdir = pathlib.Path(workdir)
  found = [workdir / name for name in RESULT_FILES
           if (workdir / name).is_file() and (workdir / name).stat().st_size]
  # The metrics writer creates an event file with its first record, so one
  # that exists holds results.
  found += sorted(workdir.glob('events.out.tfevents.*'))
  best = workdir / final.BEST_DIR
  if best.is_dir() and any(best.iterdir()):
    found.append(best)
  return found


def _names(paths: list[pathlib.Path]) -> str:
  events = [p for p in paths if p.name.startswith('events.out.tfevents.')]
  names = [p.name + ('/' if p.is_dir() else '') for p in paths if p not in events]
  if events:
    names.append(f'{len(events)} TensorBoard event file{"s" if len(events) > 1 else ""}')
  return ', '.join(names)


def claim_workdir(workdir: str | pathlib.Path, fresh: bool) -> None:
  """Lets a run start at round 0 in ``workdir`` only if that loses no earlier results.

  With ``fresh`` the earlier results are deleted, with a warning; without it
  the run is refused with one line naming ``--fresh``. Refused rather than
  moved aside: a workdir that holds results but no checkpoint to resume from
  is most often a finished or long run whose checkpoints were deleted, all
  unreadable or never written, and the user who reruns its command expects it
  to resume. Silently training again from round 0 could cost hours and leave
  two runs' results side by side; a refusal costs one more command and loses
  nothing, and what ``--fresh`` deletes is what the user asked to delete.

  Raises:
    checkpoint.CheckpointError: ``workdir`` holds results and ``fresh`` is off.
  """
  found = earlier_results(workdir)
  if not found:
    # Before process 0 writes its first record, every process has looked.
    distributed.barrier('mocosfl_workdir_claimed')
    return
  if not fresh:
    raise checkpoint.CheckpointError(
        f'{workdir} holds the results of an earlier run ({_names(found)}) but no checkpoint to '
        'resume from: pass --fresh to delete them and start over, or use another --workdir')
  log.warning('--fresh: deleting %s in %s', _names(found), workdir)
  for path in found if distributed.is_primary() else ():
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()
  distributed.barrier('mocosfl_workdir_claimed')


# ---------------------------------------------------------------------------
# What the run tells its user
# ---------------------------------------------------------------------------

def describe_table(info: dict) -> str:
  """``describe``'s dict as a short table, printed when the run starts."""
  comm = info['communication_per_client_mb']
  rows = [
      ('devices', ', '.join(info['devices'])),
      ('clients', f'{info["num_clients"]:,}, {info["pool_size"]:,} a round, '
                  f'batch {info["batch_size"]} each'),
      ('schedule', f'{info["rounds"]:,} rounds x {info["steps_per_round"]:,} steps = '
                   f'{info["total_steps"]:,} steps'),
      ('cut', f'layer {info["cut_layer"]} ({info["paper_name"]})'
              + (f' + {info["bottleneck"]} bottleneck, smashed ' if info.get('bottleneck')
                 else ', smashed data ')
              + 'x'.join(str(n) for n in info['smashed_shape']) + ' an image'),
      ('parameters', f'client {info["client_params"]:,}, server {info["server_params"]:,}'),
      ('traffic', f'{comm["total_mb"]:,.1f} MB a client over the run, estimated '
                  f'({comm["upload_mb"]:,.1f} up, {comm["download_mb"]:,.1f} down)'),
      *([('client cost', overhead.compute_line(info['client_compute']))]
        if 'client_compute' in info else []),
      ('data', f'{info["train_samples"]:,} training, {info["test_samples"]:,} test images'
               + (f', {info["aux_train_samples"]:,} auxiliary' if 'aux_train_samples' in info
                  else '')),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(['MocoSFL run'] + [f'  {name:<{width}}  {value}' for name, value in rows])


def duration(seconds: float) -> str:
  """'45 s', '3 min 12 s' or '2 h 05 min'."""
  seconds = round(seconds)
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


def closing_block(summary: dict, summary_path: str | pathlib.Path) -> str:
  """What a finished run printed last: its kNN accuracies, probes, size, time and summary file."""
  rows = [
      ('kNN accuracy', f'{summary["initial_knn_accuracy"]:.2f}% at the start, '
                       f'{summary["final_knn_accuracy"]:.2f}% at the end, '
                       f'best {summary["best_knn_accuracy"]:.2f}%'),
      ('rounds', f'{summary["rounds"]:,} ({summary["steps"]:,} steps)'),
      ('wall time', duration(summary['wall_seconds'])),
      ('throughput', f'{summary["images_per_second"]:,.1f} images/s '
                     f'({summary["steps_per_second"]:.2f} steps/s)'),
  ]
  width = max(len(name) for name, _ in rows)
  lines = ['MocoSFL run finished'] + [f'  {name:<{width}}  {value}' for name, value in rows]
  if 'probes' in summary:
    lines.append(f'  probes ({summary["probes"]["probe_epochs"]} epochs, accuracy %)')
    lines += ['    ' + line for line in final.format_table(summary['probes']).splitlines()]
  if 'attack' in summary:
    m = summary['attack']['metrics']
    lines.append(f'  model-inversion attack: MSE {m["mse"]:.4f}, SSIM {m["ssim"]:.3f}, '
                 f'PSNR {m["psnr"]:.2f} dB')
  lines.append(f'  summary: {summary_path}')
  return '\n'.join(lines)


def time_left(rounds_left: int, paced_rounds: int, paced_seconds: float) -> str:
  """The time ``rounds_left`` rounds take at the pace of ``paced_rounds`` in ``paced_seconds``.

  '?' before there is a paced round: a process's first round compiles, so
  the pace is measured from its end.
  """
  if not paced_rounds:
    return '?'
  return tqdm.tqdm.format_interval(rounds_left * paced_seconds / paced_rounds)


class _AboveTheBar(logging.Handler):
  """Hands each record to ``handlers`` with the progress bars cleared around it."""

  def __init__(self, handlers: list[logging.Handler]):
    super().__init__()
    self.handlers = handlers

  def emit(self, record: logging.LogRecord) -> None:
    with tqdm.tqdm.external_write_mode():
      for handler in self.handlers:
        if record.levelno >= handler.level:
          handler.handle(record)


def progress_bar(start: int, num_rounds: int) -> tqdm.tqdm:
  """The bar over rounds ``start`` to ``num_rounds``; the loop sets its postfix.

  tqdm's own estimate of the time left would count the first round's
  compilation: the postfix shows ``time_left``'s instead.
  """
  return tqdm.tqdm(range(start, num_rounds), desc='rounds', initial=start, total=num_rounds,
                   dynamic_ncols=True, disable=not distributed.is_primary(),
                   bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} '
                              '[{elapsed}{postfix}]')


@contextlib.contextmanager
def logs_above_the_bar():
  """Log records written while a progress bar shows go on lines of their own above it.

  Wraps the root logger's handlers whatever they are (tqdm's
  logging_redirect_tqdm would add a second console handler beside absl's,
  which it does not recognise, and print every record twice).
  """
  root = logging.getLogger()
  handlers = root.handlers
  root.handlers = [_AboveTheBar(handlers)]
  try:
    yield
  finally:
    root.handlers = handlers


# Contrastive accuracy at most this many times chance counts as chance: a
# round's mean covers hundreds of rows or more, so chance rarely exceeds it.
CHANCE_MARGIN = 3.0


def collapsed(loss: float, accuracy: float, negatives: int, symmetric: bool) -> bool:
  """Whether a round's mean loss and contrastive accuracy are those of a collapsed model.

  A collapsed model gives every input the same output, so each positive key
  scores like each of the ``negatives`` queued keys: the loss is then
  ``moco.collapse_value`` and the positive is picked as often as chance,
  1 / (negatives + 1). The loss alone does not tell: early in a run an
  untrained network's outputs are nearly parallel and the loss comes close
  to that value too, but such a model already picks the positive far more
  often than chance (configs/quickstart.py, round 2: loss 10.65 against
  11.10, accuracy 0.046 against 0.004). So both must hold: the loss within
  1% of the value and the accuracy at chance. A loss equal to the value to
  1e-4 is collapse whatever the accuracy: every logit is then equal to float
  precision, and the accuracy only says how their ties were broken.
  """
  value = moco.collapse_value(negatives, symmetric)
  gap = abs(loss - value) / value
  at_chance = accuracy <= CHANCE_MARGIN / (negatives + 1)
  return gap <= 1e-4 or (gap <= 0.01 and at_chance)


def negatives_per_row(config) -> int:
  """Keys each query is contrasted with: the shared queue, or its client's share of it."""
  q = config.moco.queue_size
  return q if config.moco.feature_sharing else q // config.num_clients


class CollapseWatch:
  """Says so, once, when training collapses, and again only after it recovered."""

  def __init__(self, negatives: int, symmetric: bool):
    self.negatives = negatives
    self.symmetric = symmetric
    self._collapsed = False

  def check(self, round_: int, loss: float, accuracy: float) -> str | None:
    """The warning for ``round_``'s mean loss and contrastive accuracy, if a collapse starts there."""
    was, self._collapsed = self._collapsed, collapsed(loss, accuracy, self.negatives,
                                                      self.symmetric)
    if was or not self._collapsed:
      return None
    return (f'round {round_}: training has collapsed: the model no longer tells an image\'s '
            f'other view from the {self.negatives} keys in the queue (loss {loss:.2f}, the value '
            f'when all score alike; contrastive accuracy {accuracy:.4f}, chance '
            f'{1 / (self.negatives + 1):.4f}); runs rarely recover from this')


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def describe(exp: Experiment, state: state_lib.SimState) -> dict:
  """What runs, said once at the start."""
  c = exp.config
  client0 = jax.tree.map(lambda x: x[0], state.clients.online)
  image = jnp.zeros((1, c.model.image_size, c.model.image_size, 3))
  smashed = jax.eval_shape(exp.client_net.apply, {'params': client0}, image)
  client_params = state_lib.count_params(client0)
  return {
      'devices': [str(d) for d in jax.devices()],
      'client_impl': exp.client_impl,
      'num_clients': c.num_clients,
      'pool_size': exp.pool_size,
      'batch_size': c.batch_size,
      'steps_per_round': exp.steps_per_round,
      'rounds': c.num_rounds,
      'total_steps': c.num_rounds * exp.steps_per_round,
      'cut_layer': c.cut_layer,
      'paper_name': split.paper_name(c.cut_layer, c.model.depth),
      'client_params': client_params,
      'server_params': state_lib.count_params(state.server['params']),
      'smashed_shape': list(smashed.shape[1:]),
      'bottleneck': c.model.bottleneck,
      # communication_per_client_mb and client_compute
      **overhead.per_client(c, exp.client_net, exp.client_tx, pool_size=exp.pool_size,
                            steps_per_round=exp.steps_per_round),
      'train_samples': len(exp.train),
      **({'aux_train_samples': len(exp.aux)} if exp.aux is not None else {}),
      'test_samples': len(exp.test),
  }


class _Discarded:
  """The metrics writer of a process other than the primary: its records are the primary's."""

  def write(self, record) -> None:
    del record


def metrics_writer(workdir: pathlib.Path, resume_from_round: int | None):
  """The primary's MetricsWriter; the other processes write nothing."""
  if distributed.is_primary():
    return metrics_lib.MetricsWriter(workdir, resume_from_round=resume_from_round)
  return contextlib.nullcontext(_Discarded())


def round_record(step_metrics: dict) -> dict:
  """A round's record: the means of its steps' metrics.

  A step of edge clients that all dropped out (``valid_rows`` 0, sfl/step.py)
  has no loss or accuracy: those are the means over the other steps, None
  when there are none.
  """
  record = {k: float(np.mean(v)) for k, v in step_metrics.items()}
  rows = np.asarray(step_metrics.get('valid_rows', 1))
  if np.all(rows > 0):
    return record
  for name in ('loss', 'contrastive_accuracy'):
    values = np.asarray(step_metrics[name])[rows > 0]
    record[name] = float(np.mean(values)) if values.size else None
  return record


@jax.jit
def all_finite(tree) -> jax.Array:
  """One boolean on the device: no floating-point leaf of ``tree`` holds NaN or inf."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def run(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
        edge=None) -> dict:
  """Trains MocoSFL as configured, writing metrics.jsonl and summary.json into workdir.

  A workdir that holds checkpoints resumes from the newest readable one, and
  the result is exactly that of an uninterrupted run. Checkpoints are saved
  every ``config.checkpoint.every`` rounds and at the end.

  Args:
    config: the experiment's config; with ``auto_adjust`` on, the run uses
      (and its checkpoints and summary record) the values it derives.
    workdir: directory for metrics, summaries and checkpoints.
    fresh: delete the workdir's checkpoints and results and start over
      instead of resuming.

  Returns:
    The summary also written to ``workdir/summary.json``.

  Raises:
    config_checks.ConfigError: a config field that cannot work.
    checkpoint.CheckpointError: the workdir's checkpoint is of another config,
      or the workdir holds results but no checkpoint to resume from
      (``claim_workdir``).
    sources.DataError: missing or bad data.
    FloatingPointError: the loss or the state became non-finite; the
      checkpoints saved before are kept.
    checkpoint.Interrupted: SIGINT or SIGTERM stopped the run after a round,
      whose checkpoint is saved.
  """
  config_checks.validate(config)
  init_from.check(config)
  if distributed.many() and config.privacy.attack_at_end:
    raise config_checks.ConfigError(
        f'privacy.attack_at_end runs in one process, not in {jax.process_count()}: pass '
        '--config.privacy.attack_at_end=False and attack the finished run with '
        'python -m mocosfl_jax.attack')
  if config.auto_adjust:
    replaced = config_lib.replaced_by_auto_adjust(config)
    if replaced:
      log.warning('auto_adjust replaces %s; pass --config.auto_adjust=False to keep them',
                  ', '.join(replaced))
    config = config_lib.resolved(config)
    log.info('auto_adjust for %d clients: batch_size %d, client_sample_ratio %g, sync_every %d, '
             'num_rounds %d', config.num_clients, config.batch_size, config.client_sample_ratio,
             config.sync_every, config.num_rounds)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  checkpoints = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep, fresh=fresh)
  try:
    # Before the data is loaded and anything compiles.
    if checkpoints.check_compatible(config) is None:
      claim_workdir(workdir, fresh)
    return _run(config, workdir, checkpoints, started, edge)
  finally:
    # A save still in flight may hold the last good state: let it land.
    checkpoints.close()


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path,
         checkpoints: checkpoint.Checkpoints, started: float, edge=None) -> dict:
  exp = build(config, edge)
  if edge is not None:
    edge.attach(exp)
  c = exp.config
  config_checks.validate(c, num_train_samples=len(exp.train),
                         samples_per_client=[len(ix) for ix in exp.partition.client_indices])
  if distributed.is_primary():
    metrics_lib.write_json(workdir / 'partition.json',
                           exp.partition.summary(exp.table_labels()))

  root = jax.random.key(c.seed)
  init_key, round_key = jax.random.split(root)
  abstract_state = jax.eval_shape(exp.init_state, init_key)
  abstract_state = (on_device(abstract_state) if exp.layout is None
                    else exp.layout.abstract(abstract_state))
  restored = checkpoints.restore(abstract_state, c)
  best = final.BestKnnModel(workdir)
  if restored is None:
    # Every checkpoint that passed check_compatible was unreadable after all.
    claim_workdir(workdir, fresh=False)
    state = exp.init_state(init_key)
    if c.init.from_workdir:
      state = init_from.load_into(state, c)
    if exp.layout is None:
      # Committed to the device, as a restored state is: the programs are then
      # the same, and a resumed process finds them in the persistent compilation cache.
      state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    start, knn_history, train_seconds, elapsed_before = 0, [], 0.0, 0.0
    timed_rounds, timed_seconds = 0, 0.0
  else:
    state, meta = restored
    start = meta['round']
    knn_history = [tuple(entry) for entry in meta['knn_history']]
    train_seconds, elapsed_before = meta['train_seconds'], meta['elapsed_s']
    timed_rounds, timed_seconds = meta.get('timed_rounds', 0), meta.get('timed_seconds', 0.0)
    log.info('resuming from the checkpoint of round %d in %s', start, checkpoints.directory)
  elapsed = lambda: elapsed_before + time.time() - started
  data = exp.client_data()
  bank_images, test_images = exp.bank_images(data), exp.test_images()
  if exp.layout is not None:
    state = exp.layout.place(state)
  if edge is not None:
    edge.start(state)
  info = describe(exp, state)
  if distributed.is_primary():
    print(describe_table(info), flush=True)
  symmetric = moco.is_symmetric(c.moco.loss, c.moco.version)
  collapse = CollapseWatch(negatives_per_row(c), symmetric)
  best_meta = best.meta(c)
  best_knn = max(best_trained_knn(knn_history),
                 best_meta['knn_accuracy'] if best_meta else -math.inf)

  # claim_workdir left no records to a run from round 0.
  resume_from_round = None if restored is None else start
  with metrics_writer(workdir, resume_from_round) as writer, \
       checkpoint.StopOnSignal() as signals, logs_above_the_bar(), \
       progress_bar(start, c.num_rounds) as bar:
    if restored is None:
      initial_knn = evaluate_knn(exp, state, bank_images, test_images)
      log.info('kNN accuracy at initialisation: %.2f%%', initial_knn)
      knn_history.append((0, initial_knn))
      writer.write({'round': 0, 'step': 0, 'knn_accuracy': initial_knn,
                    'elapsed_s': elapsed()})
    last_saved = start
    paced_since = None
    for r in bar:
      tick = time.time()
      state, step_metrics = exp.run_round(state, data, round_key)
      step_metrics, finite = distributed.to_host((step_metrics, all_finite(state)))
      seconds = time.time() - tick
      train_seconds += seconds
      # A process's first round compiles the round program: throughput leaves it out.
      if r > start:
        timed_rounds, timed_seconds = timed_rounds + 1, timed_seconds + seconds
      record = round_record(step_metrics)
      # Drop-outs of edge clients: always recorded.
      edge_record = {} if edge is None else edge.round_record()
      record.update(edge_record)
      rounds_done = r + 1
      trained = record['loss'] is not None  # else every step's edge clients dropped out
      if not ((not trained or np.isfinite(record['loss'])) and finite):
        what = ('parameters' if not trained or np.isfinite(record['loss'])
                else f'loss {record["loss"]}')
        raise FloatingPointError(
            f'non-finite {what} in round {rounds_done} '
            f'(steps {r * exp.steps_per_round + 1}-{rounds_done * exp.steps_per_round}); '
            + (f'the checkpoint of round {last_saved} is kept' if last_saved
               else 'no checkpoint was saved'))
      warning = trained and collapse.check(rounds_done, record['loss'],
                                           record['contrastive_accuracy'])
      if warning:
        log.warning('%s', warning)
      if rounds_done % c.eval.every == 0 or rounds_done == c.num_rounds:
        shared = mesh_model(exp, state)
        record['knn_accuracy'] = knn_on_primary(exp, shared, bank_images, test_images)
        knn_history.append((rounds_done, record['knn_accuracy']))
        # Process 0 decides (the others hold its accuracy in float32), as a
        # save that only some of them joined would never finish.
        if distributed.agreed(record['knn_accuracy'] > best_knn):
          best_knn = record['knn_accuracy']
          best.save(shared, rounds_done, best_knn, c)
      if (rounds_done % c.log_every == 0 or 'knn_accuracy' in record
          or rounds_done == c.num_rounds or edge_record.get('edge_drops')):
        writer.write({'round': rounds_done, 'step': rounds_done * exp.steps_per_round,
                      **record, 'elapsed_s': elapsed()})
      if paced_since is None:
        paced_since = time.time()
      bar.set_postfix({'loss': f'{record["loss"]:.3f}' if trained else '-',
                       'knn': f'{knn_history[-1][1]:.1f}',
                       'left': time_left(c.num_rounds - rounds_done, r - start,
                                         time.time() - paced_since)})
      # Saved after the round's record is written: a resume from this
      # checkpoint keeps exactly the records up to this round.
      stop = distributed.anyone(signals.signum is not None) and rounds_done < c.num_rounds
      if rounds_done % c.checkpoint.every == 0 or rounds_done == c.num_rounds or stop:
        checkpoints.save(state, rounds_done, c, {
            'knn_history': knn_history, 'train_seconds': train_seconds,
            'timed_rounds': timed_rounds, 'timed_seconds': timed_seconds,
            'elapsed_s': elapsed()})
        last_saved = rounds_done
      if stop:
        checkpoints.wait()
        raise checkpoint.Interrupted(signals.signum or signal.SIGTERM, rounds_done)
  # Ctrl-C from here on stops at once (cli.stop_at_once_on_interrupt): the
  # last round's checkpoint must have landed by then.
  checkpoints.wait()

  initial_knn = knn_history[0][1]
  steps = c.num_rounds * exp.steps_per_round
  # Valid rows only: padding rows of ragged batches are not images.
  images_per_step = (2 * exp.pool_size * c.batch_size
                     * float(np.mean(exp.partition.batch_multiplier)))
  if timed_rounds:
    rate = timed_rounds * exp.steps_per_round / timed_seconds
  else:  # every round was some process's first
    rate = steps / train_seconds
  summary = {
      'initial_knn_accuracy': initial_knn,
      'final_knn_accuracy': knn_history[-1][1],
      'best_knn_accuracy': best_trained_knn(knn_history, default=initial_knn),
      'rounds': c.num_rounds,
      'steps': steps,
      'wall_seconds': elapsed(),
      'train_seconds': train_seconds,
      'timed_rounds': timed_rounds,
      'timed_seconds': timed_seconds,
      'steps_per_second': rate,
      'images_per_second': rate * images_per_step,
      'run': info,
      'config': c.to_dict(),
  }
  if c.eval.final_probes:
    summary['probes'] = final_probes(exp, state, best, knn_history, abstract_state,
                                     bank_images, test_images)
    # Process 0 probes alone: the others wait here rather than in JAX's
    # shutdown, which gives up after 5 minutes.
    distributed.barrier('mocosfl_final_probes')
  if c.privacy.attack_at_end:
    # Also writes attack.json and attack.png (python -m mocosfl_jax.attack).
    summary['attack'] = privacy_attack.at_end(exp, state, workdir)
  if distributed.is_primary():
    metrics_lib.write_json(workdir / 'summary.json', summary)
    print(closing_block(summary, workdir / 'summary.json'), flush=True)
  return summary
