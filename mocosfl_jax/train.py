"""The MocoSFL run: data, partition, state, rounds, evaluation, outputs.

This is the only module that knows the order of things. Everything it calls is
a pure function or a small object from the library below it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import metrics as metrics_lib
from mocosfl_jax import overhead
from mocosfl_jax.data import augment, partition, sources
from mocosfl_jax.evaluation import features, final
from mocosfl_jax.models import split
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

  def init_state(self, key: jax.Array) -> state_lib.SimState:
    c = self.config
    init = functools.partial(
        state_lib.init_state, client_net=self.client_net, server_net=self.server_net,
        server_tx=self.server_tx, client_tx=self.client_tx, num_clients=c.num_clients,
        image_size=c.model.image_size, queue_size=c.moco.queue_size,
        feature_sharing=c.moco.feature_sharing)
    # Compiled: run op by op, initialisation takes longer than compiling it.
    return jax.jit(init)(key)

  def client_data(self) -> rounds.ClientData:
    table, counts = partition.padded(self.partition.client_indices)
    return rounds.ClientData(jnp.asarray(self.train.images), jnp.asarray(table),
                             jnp.asarray(counts))


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


def build(config: ml_collections.ConfigDict) -> Experiment:
  """Loads data, partitions it and builds models, optimisers and compiled functions."""
  c = config
  train = sources.load_split(c.data, 'train')
  test = sources.load_split(c.data, 'test')
  part = partition.make_partition(train.labels, train.num_classes, c.num_clients,
                                  c.noniid_ratio, c.data, c.seed)
  _, counts = partition.padded(part.client_indices)
  steps = steps_per_round(c, counts, part.batch_multiplier)
  pool = pool_size(c)

  client_impl = resolve_client_impl(c.model.client_impl)
  client_net, server_net = split.build(c, as_matmul=client_impl == 'matmul')
  server_tx = optim.sgd(c.optim.momentum, c.optim.weight_decay)
  client_tx = optim.sgd(c.optim.momentum, c.optim.weight_decay)
  client_base = c.optim.lr if c.optim.client_lr < 0 else c.optim.client_lr
  if optim.schedule_kind(c.optim.schedule, c.moco.version) == 'multistep':
    server_lr = optim.multistep(c.optim.lr, c.num_rounds, 0.1)
    per_step = per_round = optim.multistep(client_base, c.num_rounds, 0.2)
  else:
    server_lr = optim.cosine_per_epoch(c.optim.lr, c.num_rounds)
    per_step = optim.reference_client_cosine(client_base, c.num_rounds)
    per_round = optim.cosine_per_epoch(client_base, c.num_rounds)
  if c.optim.client_schedule == 'per_client_step':
    client_lr = lambda steps, rnd: per_step(steps)
  else:
    client_lr = lambda steps, rnd: jnp.broadcast_to(per_round(rnd), steps.shape)

  mean, std = sources.normalization(c.data.name)
  version = c.moco.augmentation
  if version == 'auto':
    version = 'mocov1' if c.moco.version == 'V1' else 'mocov2'
  pair_augment = augment.make_pair_augment(version, mean, std, c.model.image_size,
                                          (c.moco.crop_scale_min, 1.0))
  train_step = step_lib.make_train_step(
      client_net, server_net, server_tx, client_tx, pair_augment,
      temperature=c.moco.temperature, ema_decay=c.moco.ema_decay,
      client_impl='map' if client_impl == 'map' else 'vmap',
      server_lr=server_lr, client_lr=client_lr,
      server_batch=rounds.most_rows(c.batch_size * part.batch_multiplier, pool),
      symmetric=moco.is_symmetric(c.moco.loss, c.moco.version))
  run_round = rounds.make_round(
      train_step, num_clients=c.num_clients, pool_size=pool, steps=steps,
      batch_size=c.batch_size, sync_every=c.sync_every, average_ema=c.fedavg.average_ema,
      weighting=c.fedavg.weighting, one_program=resolve_round_impl(c.round_impl) == 'scan',
      batch_multiplier=part.batch_multiplier,
      passes=rounds.passes_needed(counts, c.batch_size * np.asarray(part.batch_multiplier),
                                  steps))
  embed = features.make_embed(client_net, server_net, mean, std, c.eval.batch_size)
  return Experiment(c, train, test, part, client_net, server_net, server_tx, client_tx,
                    run_round, embed, steps, pool, client_impl)


# ---------------------------------------------------------------------------
# Evaluation during training
# ---------------------------------------------------------------------------

def evaluate_knn(exp: Experiment, state: state_lib.SimState, bank_images, test_images) -> float:
  """kNN accuracy (%) of client 0's online model with the online server and head (spec 5.1).

  After every round's closing FedAvg all clients hold the same online model.
  """
  return final.knn_accuracy(exp, final.eval_model(state), bank_images, test_images)


def on_device(abstract_tree):
  """``abstract_tree``'s shapes and dtypes on the first device, as orbax restores them."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
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
                      final.eval_model(state))}
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
  return final.final_evaluation(exp, models, final.probe_key(c.seed), c.eval.probe_epochs,
                                bank_images, test_images)


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
  comm = overhead.communication_per_client(
      rounds=c.num_rounds, pool_size=exp.pool_size, num_clients=c.num_clients,
      steps_per_round=exp.steps_per_round, batch_size=c.batch_size,
      smashed_floats=math.prod(smashed.shape[1:]), client_params=client_params,
      sync_every=c.sync_every)
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
      'paper_name': split.PAPER_NAMES.get(c.cut_layer, f'cut {c.cut_layer}'),
      'client_params': client_params,
      'server_params': state_lib.count_params(state.server['params']),
      'smashed_shape': list(smashed.shape[1:]),
      'communication_per_client_mb': comm,
      'train_samples': len(exp.train),
      'test_samples': len(exp.test),
  }


@jax.jit
def all_finite(tree) -> jax.Array:
  """One boolean on the device: no floating-point leaf of ``tree`` holds NaN or inf."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def run(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False) -> dict:
  """Trains MocoSFL as configured, writing metrics.jsonl and summary.json into workdir.

  A workdir that holds checkpoints resumes from the newest readable one, and
  the result is exactly that of an uninterrupted run. Checkpoints are saved
  every ``config.checkpoint.every`` rounds and at the end.

  Args:
    config: the experiment's config; with ``auto_adjust`` on, the run uses
      (and its checkpoints and summary record) the values it derives.
    workdir: directory for metrics, summaries and checkpoints.
    fresh: delete the workdir's checkpoints and start over instead of resuming.

  Returns:
    The summary also written to ``workdir/summary.json``.

  Raises:
    config_checks.ConfigError: a config field that cannot work.
    checkpoint.CheckpointError: the workdir's checkpoint is of another config.
    sources.DataError: missing or bad data.
    FloatingPointError: the loss or the state became non-finite; the
      checkpoints saved before are kept.
    checkpoint.Interrupted: SIGINT or SIGTERM stopped the run after a round,
      whose checkpoint is saved.
  """
  config_checks.validate(config)
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
    checkpoints.check_compatible(config)
    return _run(config, workdir, checkpoints, started)
  finally:
    # A save still in flight may hold the last good state: let it land.
    checkpoints.close()


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path,
         checkpoints: checkpoint.Checkpoints, started: float) -> dict:
  exp = build(config)
  c = exp.config
  config_checks.validate(c, num_train_samples=len(exp.train),
                         samples_per_client=[len(ix) for ix in exp.partition.client_indices])
  metrics_lib.write_json(workdir / 'partition.json', exp.partition.summary(exp.train.labels))

  root = jax.random.key(c.seed)
  init_key, round_key = jax.random.split(root)
  abstract_state = on_device(jax.eval_shape(exp.init_state, init_key))
  restored = checkpoints.restore(abstract_state, c)
  best = final.BestKnnModel(workdir)
  if restored is None:
    # A best-kNN model left here belongs to a discarded run.
    best.clear()
    state = exp.init_state(init_key)
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
  test_images = jnp.asarray(exp.test.images)
  info = describe(exp, state)
  log.info('MocoSFL run: %s', json.dumps(info))
  symmetric = moco.is_symmetric(c.moco.loss, c.moco.version)
  collapse = moco.collapse_value(c.moco.queue_size, symmetric)
  best_meta = best.meta(c)
  best_knn = max(best_trained_knn(knn_history),
                 best_meta['knn_accuracy'] if best_meta else -math.inf)

  metrics_path = workdir / metrics_lib.METRICS_FILENAME
  if restored is not None:
    resume_from_round = start
  elif metrics_path.exists():
    # A run killed before its first checkpoint: drop all of its records.
    resume_from_round = -1
  else:
    resume_from_round = None
  with metrics_lib.MetricsWriter(workdir, resume_from_round=resume_from_round) as writer, \
       checkpoint.StopOnSignal() as signals:
    if restored is None:
      initial_knn = evaluate_knn(exp, state, data.images, test_images)
      log.info('kNN accuracy at initialisation: %.2f%%', initial_knn)
      knn_history.append((0, initial_knn))
      writer.write({'round': 0, 'step': 0, 'knn_accuracy': initial_knn,
                    'elapsed_s': elapsed()})
    last_saved = start
    bar = tqdm.tqdm(range(start, c.num_rounds), desc='rounds', unit='round', initial=start,
                    total=c.num_rounds, dynamic_ncols=True)
    for r in bar:
      tick = time.time()
      state, step_metrics = exp.run_round(state, data, round_key)
      step_metrics, finite = jax.device_get((step_metrics, all_finite(state)))
      seconds = time.time() - tick
      train_seconds += seconds
      # A process's first round compiles the round program: throughput leaves it out.
      if r > start:
        timed_rounds, timed_seconds = timed_rounds + 1, timed_seconds + seconds
      record = {k: float(np.mean(v)) for k, v in step_metrics.items()}
      rounds_done = r + 1
      if not (np.isfinite(record['loss']) and finite):
        what = ('parameters' if np.isfinite(record['loss'])
                else f'loss {record["loss"]}')
        raise FloatingPointError(
            f'non-finite {what} in round {rounds_done} '
            f'(steps {r * exp.steps_per_round + 1}-{rounds_done * exp.steps_per_round}); '
            + (f'the checkpoint of round {last_saved} is kept' if last_saved
               else 'no checkpoint was saved'))
      if abs(record['loss'] - collapse) < 0.01 * collapse:
        log.warning('round %d: loss %.3f is at the collapse value (ln(K+1) a term) %.2f',
                    rounds_done, record['loss'], collapse)
      if rounds_done % c.eval.every == 0 or rounds_done == c.num_rounds:
        model = final.eval_model(state)
        record['knn_accuracy'] = final.knn_accuracy(exp, model, data.images, test_images)
        knn_history.append((rounds_done, record['knn_accuracy']))
        if record['knn_accuracy'] > best_knn:
          best_knn = record['knn_accuracy']
          best.save(model, rounds_done, best_knn, c)
      if rounds_done % c.log_every == 0 or 'knn_accuracy' in record or rounds_done == c.num_rounds:
        writer.write({'round': rounds_done, 'step': rounds_done * exp.steps_per_round,
                      **record, 'elapsed_s': elapsed()})
      bar.set_postfix(loss=f'{record["loss"]:.3f}',
                      knn=f'{knn_history[-1][1]:.1f}')
      # Saved after the round's record is written: a resume from this
      # checkpoint keeps exactly the records up to this round.
      stop = signals.signum is not None and rounds_done < c.num_rounds
      if rounds_done % c.checkpoint.every == 0 or rounds_done == c.num_rounds or stop:
        checkpoints.save(state, rounds_done, c, {
            'knn_history': knn_history, 'train_seconds': train_seconds,
            'timed_rounds': timed_rounds, 'timed_seconds': timed_seconds,
            'elapsed_s': elapsed()})
        last_saved = rounds_done
      if stop:
        checkpoints.wait()
        raise checkpoint.Interrupted(signals.signum, rounds_done)

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
                                     data.images, test_images)
  metrics_lib.write_json(workdir / 'summary.json', summary)
  return summary
