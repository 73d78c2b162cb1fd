"""Final evaluations of a trained model and the best-kNN model kept for them.

The evaluated model is what the reference evaluates: client 0's online model
(after a round's closing FedAvg every client holds the average) followed by
the online server. Its kNN accuracy uses the projection-head output (spec
5.1); the probes use the frozen 512-d pooled backbone feature with the head
removed (spec 5.2), of the un-augmented, normalised training and test sets.

The reference reloads the checkpoint with the best test kNN accuracy and
reports, for each probe, the best test accuracy over its epochs (spec 4.9,
9.13): two selections on the test set. Those are the reference's numbers
here; next to them go the last-epoch accuracies of the final model, which
involve no selection on the test set.
"""
from __future__ import annotations

import logging
import math
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mocosfl_jax import checkpoint
from mocosfl_jax import distributed
from mocosfl_jax.evaluation import knn, probes

log = logging.getLogger('mocosfl_jax')

BEST_DIR = 'best_knn'
MLP_LABEL_FRACTIONS = {'mlp_10pct': 0.1, 'mlp_1pct': 0.01}
PROBES = ('linear', *MLP_LABEL_FRACTIONS)
# Batch size of every probe in the reference.
PROBE_BATCH_SIZE = 128
# Folded into the run's seed: the probes' key is independent of the keys
# that train.run splits from the seed, and equal in train.run and evaluate.
_PROBE_STREAM = 0x9B0BE

PROTOCOL = (
    'client 0 + online server, frozen; kNN on the L2-normalised head output; '
    'probes on the pooled backbone feature (512-d at width 1, head removed) of the full, '
    'un-augmented training set in a fixed random order, batch 128, Adam 1e-3; '
    'linear: the reference cosine stepped per iteration (spec 5.2); MLP '
    '(Linear-BN-ReLU-Linear) on random 10% and 1% label subsets, x0.1 at '
    'iterations int(0.6 E) and int(0.8 E) (spec 5.3)')
REFERENCE_DEFINITION = (
    "the reference's numbers: best test accuracy over the probe epochs, of the "
    'model with the best test kNN accuracy (two selections on the test set, spec 9.13)')
HONEST_DEFINITION = ('test accuracy after the last probe epoch, of a model '
                     'chosen without the test set')


def probe_key(seed: int) -> jax.Array:
  """The final probes' PRNG key of a run with ``seed``."""
  return jax.random.fold_in(jax.random.key(seed), _PROBE_STREAM)


@jax.jit
def eval_model(state) -> dict[str, Any]:
  """``{'client': client 0's online params, 'server': online server variables}``.

  The arrays are copies: the next round donates the state's buffers.
  """
  return {'client': jax.tree.map(lambda x: x[0], state.clients.online),
          'server': jax.tree.map(jnp.copy, state.server)}


def knn_accuracy(exp, model: Mapping[str, Any], bank_images, test_images) -> float:
  """kNN accuracy (%) of ``model`` (spec 5.1) with ``exp.config.eval``'s k and T."""
  bank = exp.embed(model['client'], model['server'], bank_images, head=True)
  queries = exp.embed(model['client'], model['server'], test_images, head=True)
  return float(knn.knn_accuracy(bank, exp.train.labels, queries, exp.test.labels,
                                exp.train.num_classes, k=exp.config.eval.knn_k,
                                temperature=exp.config.eval.knn_temperature))


def _probe_entry(result: probes.ProbeResult, labelled: int) -> dict[str, Any]:
  return {'last_epoch': result.last_test_accuracy,
          'best_epoch': result.best_test_accuracy,
          'best_epoch_index': result.best_epoch,
          'labelled_examples': labelled,
          'steps': result.steps,
          'final_train_loss': result.final_train_loss}


def unlearned_notes(evaluated: Mapping[str, Mapping[str, Any]], num_classes: int) -> list[str]:
  """A line for each probe whose head ended no better on its training set than a uniform guess.

  Such a probe's test accuracy measures its random start, not the features.
  That is what a short probe on a small training set gives: the protocol
  counts epochs (made for CIFAR-10, 391 batches each), Adam moves a weight
  by about the learning rate per step, and a Xavier-initialised head on the
  non-negative pooled features, whose common component outweighs the
  class-dependent part, starts out predicting nearly one class. Two epochs
  of the quickstart's 1,437 images are 24 steps, half of them at rate 0 under
  the reference's cosine (horizon 1): its linear probe stays at chance
  (10%), where 100 epochs (1,200 steps) give 88.1% next to 89.4% kNN.
  """
  chance_loss = math.log(num_classes)
  notes, seen_rounds = [], set()
  for name, entry in evaluated.items():
    if entry['round'] in seen_rounds:
      continue
    seen_rounds.add(entry['round'])
    for probe in PROBES:
      result = entry[probe]
      if result is None or result['final_train_loss'] < chance_loss:
        continue
      notes.append(
          f'{probe} probe ({name}): training loss {result["final_train_loss"]:.2f} after '
          f'{result["steps"]:,} Adam steps is no lower than a uniform guess\'s ln({num_classes})'
          f' = {chance_loss:.2f}: the head has not learned yet, so its test accuracy does not '
          'measure the features; more probe epochs give it more steps')
  return notes


def probe_model(exp, model: Mapping[str, Any], bank_images, test_images, key: jax.Array,
                epochs: int) -> dict[str, Any]:
  """The linear probe and the MLP probes on 10% and 1% labels of one model.

  Args:
    exp: the run's ``train.Experiment``.
    model: an ``eval_model`` tree.
    bank_images: the full training set's images, in ``exp.train`` order.
    test_images: the test set's images.
    key: PRNG key; equal keys give equal numbers.
    epochs: epochs of every probe.

  Returns:
    ``{'linear': entry, 'mlp_10pct': entry, 'mlp_1pct': entry}``, each entry
    with the last epoch's and the best epoch's test accuracy (%), the best
    epoch's 0-based index and the number of labelled examples; None for an
    MLP probe whose label fraction holds no example.
  """
  train_x = exp.embed(model['client'], model['server'], bank_images, head=False)
  test_x = exp.embed(model['client'], model['server'], test_images, head=False)
  train_y, test_y = jnp.asarray(exp.train.labels), jnp.asarray(exp.test.labels)
  num_train, num_classes = len(exp.train.labels), exp.train.num_classes
  order_key, linear_key, *mlp_keys = jax.random.split(key, 2 + len(MLP_LABEL_FRACTIONS))
  # The reference's training loader is a once-permuted copy of the training set.
  order = jax.random.permutation(order_key, num_train)
  linear = probes.linear_probe(train_x[order], train_y[order], test_x, test_y, num_classes,
                               key=linear_key, epochs=epochs, batch_size=PROBE_BATCH_SIZE)
  results = {'linear': _probe_entry(linear, num_train)}
  for (name, fraction), mlp_key in zip(MLP_LABEL_FRACTIONS.items(), mlp_keys):
    labelled = int(fraction * num_train)
    if labelled < 1:
      log.warning('%s skipped: %g of %d training examples is none', name, fraction, num_train)
      results[name] = None
      continue
    mlp = probes.mlp_probe(train_x, train_y, test_x, test_y, num_classes, key=mlp_key,
                           label_fraction=fraction, epochs=epochs,
                           batch_size=PROBE_BATCH_SIZE)
    results[name] = _probe_entry(mlp, labelled)
  return results


def _headline(name: str, entry: Mapping[str, Any], which: str, definition: str) -> dict:
  numbers = {probe: None if entry[probe] is None else entry[probe][which]
             for probe in PROBES}
  return {'model': name, 'description': entry['description'],
          'knn_accuracy': entry['knn_accuracy'], **numbers, 'definition': definition}


def final_evaluation(exp, models: Mapping[str, tuple[str, int, Mapping[str, Any]]],
                     key: jax.Array, epochs: int, bank_images=None,
                     test_images=None) -> dict[str, Any]:
  """kNN and probes of each model, with the reference's and the honest headline.

  Args:
    exp: the run's ``train.Experiment``.
    models: name -> (description, round, ``eval_model`` tree). The name
      'best_knn' marks the model selected by test kNN accuracy; every other
      model counts as chosen without the test set. Models of the same round
      are evaluated once.
    key: PRNG key of the probes (``probe_key(seed)``), the same for every model.
    epochs: epochs of every probe.
    bank_images: the training images on the device, if already there.
    test_images: the test images on the device, if already there.

  Returns:
    ``{'probe_epochs', 'protocol', 'models': {name: {'description', 'round',
    'knn_accuracy', 'linear', 'mlp_10pct', 'mlp_1pct'}}, 'notes',
    'reference_numbers', 'honest_numbers', 'seconds'}``. The reference's
    numbers are the best-epoch accuracies of 'best_knn' (of the first model
    if there is no 'best_knn'); the honest ones are the last-epoch accuracies
    of the first model other than 'best_knn' (None if there is none). The
    notes (``unlearned_notes``) name the probes that did not learn.
  """
  started = time.time()
  bank_images = jnp.asarray(exp.train.images) if bank_images is None else bank_images
  test_images = jnp.asarray(exp.test.images) if test_images is None else test_images
  by_round = {}
  evaluated = {}
  device = jax.devices()[0]
  for name, (description, round_, model) in models.items():
    if round_ not in by_round:
      # Committed to the device, as restored arrays are: jit caches programs
      # by committedness, and a mix would compile every one twice.
      model = jax.device_put(model, device)
      by_round[round_] = {
          'knn_accuracy': knn_accuracy(exp, model, bank_images, test_images),
          **probe_model(exp, model, bank_images, test_images, key, epochs)}
    evaluated[name] = {'description': description, 'round': round_, **by_round[round_]}
    log.info('%s: %s', description, format_numbers(evaluated[name]))

  selected = 'best_knn' if 'best_knn' in evaluated else next(iter(evaluated))
  unselected = [name for name in evaluated if name != 'best_knn']
  return {
      'probe_epochs': epochs,
      'protocol': PROTOCOL,
      'models': evaluated,
      'notes': unlearned_notes(evaluated, exp.train.num_classes),
      'reference_numbers': _headline(selected, evaluated[selected], 'best_epoch',
                                     REFERENCE_DEFINITION),
      'honest_numbers': (_headline(unselected[0], evaluated[unselected[0]], 'last_epoch',
                                   HONEST_DEFINITION) if unselected else None),
      'seconds': time.time() - started,
  }


def format_numbers(entry: Mapping[str, Any]) -> str:
  """One line: kNN and every probe's last / best epoch accuracy."""
  parts = [f'kNN {entry["knn_accuracy"]:.2f}%']
  for probe in PROBES:
    if entry[probe] is not None:
      parts.append(f'{probe} {entry[probe]["last_epoch"]:.2f}% last, '
                   f'{entry[probe]["best_epoch"]:.2f}% best '
                   f'(epoch {entry[probe]["best_epoch_index"] + 1})')
  return '; '.join(parts)


def format_table(evaluation: Mapping[str, Any]) -> str:
  """The evaluation as a short text table: a row per model, then the headlines."""
  rows = [f'{"model":<10}{"round":>6}{"kNN":>8}'
          + ''.join(f'{name + " last/best":>24}' for name in PROBES)]
  for name, entry in evaluation['models'].items():
    cells = ['-' if entry[probe] is None else
             f'{entry[probe]["last_epoch"]:.2f} / {entry[probe]["best_epoch"]:.2f}'
             for probe in PROBES]
    rows.append(f'{name:<10}{entry["round"]:>6}{entry["knn_accuracy"]:>8.2f}'
                + ''.join(f'{cell:>24}' for cell in cells))
  for title, headline in (('reference', evaluation['reference_numbers']),
                          ('honest', evaluation['honest_numbers'])):
    if headline is not None:
      numbers = ', '.join(f'{probe} {"-" if headline[probe] is None else f"{headline[probe]:.2f}"}'
                          for probe in PROBES)
      rows.append(f'{title} ({headline["model"]}): {numbers}')
  steps = _steps_line(evaluation)
  if steps:
    rows.append(steps)
  rows += [f'note: {note}' for note in evaluation.get('notes', ())]
  return '\n'.join(rows)


def _steps_line(evaluation: Mapping[str, Any]) -> str:
  """Each probe's Adam steps, on which its accuracy depends more than on its epochs.

  '' for records written before the probes counted their steps.
  """
  entries = next(iter(evaluation['models'].values()))
  steps = [f'{probe} {entries[probe]["steps"]:,}' for probe in PROBES
           if entries[probe] is not None and 'steps' in entries[probe]]
  if not steps:
    return ''
  return (f'Adam steps per probe ({evaluation["probe_epochs"]} epochs, batch {PROBE_BATCH_SIZE}): '
          + ', '.join(steps))


class BestKnnModel:
  """The model with the best kNN accuracy of a run, for the final evaluation.

  It lives in ``<workdir>/best_knn/<round>/`` as an orbax checkpoint with
  items 'model' (an ``eval_model`` tree) and 'meta' (round, kNN accuracy,
  config). A new best is written before the previous one is deleted, so a
  kill leaves at least one complete copy.

  Its rounds may lie past the run's newest checkpoint when the run was killed
  in between: runs are deterministic, so a resumed run passes through the
  same states and such a model is still one of its own.
  """

  def __init__(self, workdir: str | pathlib.Path):
    """Opens ``<workdir>/best_knn`` (created on the first save)."""
    self.directory = pathlib.Path(workdir).absolute() / BEST_DIR
    self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

  def _rounds(self) -> list[int]:
    """Rounds of the complete copies: orbax renames a copy to its round when done."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

  def meta(self, config: ml_collections.ConfigDict | None = None) -> dict[str, Any] | None:
    """Metadata of the kept model (the best, if a kill left two), or None.

    Unreadable copies, and with ``config`` copies of a different config, are
    skipped with a warning.
    """
    best = None
    for round_ in self._rounds():
      try:
        meta = self._checkpointer.restore(
            self.directory / str(round_), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception as e:  # pylint: disable=broad-except  (any read failure)
        log.warning('best-kNN model of round %d is unreadable (%s); ignored', round_,
                    type(e).__name__)
        continue
      if config is not None and checkpoint.config_differences(meta['config'], config.to_dict()):
        log.warning('best-kNN model of round %d is of another config; ignored', round_)
        continue
      if best is None or meta['knn_accuracy'] > best['knn_accuracy']:
        best = meta
    return best

  def save(self, model, round_: int, knn_accuracy: float,
           config: ml_collections.ConfigDict) -> None:
    """Writes ``model`` as the best, then deletes the previous best."""
    meta = {'round': round_, 'knn_accuracy': knn_accuracy, 'config': config.to_dict()}
    self._checkpointer.save(self.directory / str(round_), force=True, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)))
    # Every process saves (orbax writes a replicated model once); one deletes.
    for path in self.directory.iterdir() if distributed.is_primary() else ():
      if path.name != str(round_):
        shutil.rmtree(path)

  def restore(self, abstract_model, config: ml_collections.ConfigDict | None = None
              ) -> tuple[Any, dict[str, Any]] | None:
    """The kept model and its metadata, or None if there is none (see ``meta``).

    Raises:
      checkpoint.CheckpointError: its arrays cannot be read.
    """
    meta = self.meta(config)
    if meta is None:
      return None
    path = self.directory / str(meta['round'])
    try:
      checkpoint.quiet_failed_reads()
      restored = self._checkpointer.restore(path, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(abstract_model), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any read failure)
      reason = ' '.join(str(e).split())[:200]
      raise checkpoint.CheckpointError(
          f'the best-kNN model in {path} is unreadable ({type(e).__name__}: {reason})') from e
    return restored.model, restored.meta
