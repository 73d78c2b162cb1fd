"""Tests for the linear and MLP probes on frozen features.

The trainer is pinned against plain Python-loop twins that write out the
reference's PyTorch semantics (per-iteration schedules, last partial batch
kept, BatchNorm with batch statistics and an unbiased running variance).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocosfl_jax.evaluation import final, probes

NUM_CLASSES = 4


def _blobs(seed, num_samples, dim=32, spread=3.0, noise=1.0):
  rng = np.random.default_rng(seed)
  centers = spread * np.random.default_rng(1234).normal(size=(NUM_CLASSES, dim))
  labels = rng.integers(NUM_CLASSES, size=num_samples)
  features = centers[labels] + noise * rng.normal(size=(num_samples, dim))
  return features.astype(np.float32), labels


@pytest.fixture(scope='module')
def blobs():
  train_x, train_y = _blobs(0, 512)
  test_x, test_y = _blobs(1, 256)
  return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------- schedules


def test_reference_schedule_oscillates_past_its_horizon():
  schedule = probes.reference_cosine_schedule(1e-3, 25)
  for t in [0, 1, 12, 25, 37, 50, 63, 75, 100, 3910]:
    assert schedule(t) == pytest.approx(1e-3 * (1 + np.cos(np.pi * t / 25)) / 2, rel=1e-5, abs=1e-10)
  # A cosine clamped at its horizon would stay at 0 from iteration 25 on.
  assert schedule(25) == pytest.approx(0.0, abs=1e-10)
  assert schedule(50) == pytest.approx(1e-3)
  assert schedule(75) == pytest.approx(0.0, abs=1e-10)


def test_epoch_cosine_schedule_is_constant_within_an_epoch():
  schedule = probes.epoch_cosine_schedule(1e-3, epochs=10, steps_per_epoch=7)
  for epoch in [0, 3, 9]:
    want = 1e-3 * (1 + np.cos(np.pi * epoch / 10)) / 2
    for step in [0, 6]:
      assert schedule(7 * epoch + step) == pytest.approx(want)


def test_multistep_schedule_drops_at_iterations_60_and_80():
  schedule = probes.multistep_schedule(1e-3, epochs=100)
  assert schedule(0) == pytest.approx(1e-3)
  assert schedule(59) == pytest.approx(1e-3)
  assert schedule(60) == pytest.approx(1e-4)
  assert schedule(79) == pytest.approx(1e-4)
  assert schedule(80) == pytest.approx(1e-5)
  assert schedule(3900) == pytest.approx(1e-5)


# ---------------------------------------------------------------- twins


def _twin_fit(variables, loss_and_stats, predict, train_x, train_y, test_x, test_y, *,
              learning_rate_at, epochs, batch_size):
  """The reference's training loop: fixed order, ragged last batch, Adam."""
  params = variables['params']
  stats = variables.get('batch_stats')
  tx = optax.adam(learning_rate_at)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, stats, x, y):
    (_, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats

  accuracies = []
  for _ in range(epochs):
    for start in range(0, len(train_y), batch_size):
      end = start + batch_size
      params, opt_state, stats = step(params, opt_state, stats, train_x[start:end],
                                      train_y[start:end])
    predictions = np.argmax(np.asarray(jax.jit(predict)(params, stats, test_x)), axis=-1)
    accuracies.append(100.0 * float(np.mean(predictions == test_y)))
  return params, stats, accuracies


def _dense(layer, x):
  return x @ layer['kernel'].T + layer['bias']


def _linear_loss(params, stats, x, y):
  logits = _dense(params['Einsum_0'], x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats


def _linear_predict(params, stats, x):
  del stats
  return _dense(params['Einsum_0'], x)


def _torch_mlp_loss(params, stats, x, y):
  """PyTorch's train-mode MLP head: normalise with the biased batch variance,
  update the running variance with the unbiased one, momentum 0.1."""
  hidden = _dense(params['Einsum_0'], x)
  mean, var = hidden.mean(axis=0), hidden.var(axis=0)
  bn = params['BatchNorm_0']
  normed = (hidden - mean) / jnp.sqrt(var + 1e-5) * bn['scale'] + bn['bias']
  logits = _dense(params['Einsum_1'], jax.nn.relu(normed))
  n = x.shape[0]
  running = stats['BatchNorm_0']
  new_stats = {'BatchNorm_0': {
      'mean': 0.9 * running['mean'] + 0.1 * jax.lax.stop_gradient(mean),
      'var': 0.9 * running['var'] + 0.1 * jax.lax.stop_gradient(var) * n / (n - 1)}}
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats


def _torch_mlp_predict(params, stats, x):
  hidden = _dense(params['Einsum_0'], x)
  running, bn = stats['BatchNorm_0'], params['BatchNorm_0']
  normed = (hidden - running['mean']) / jnp.sqrt(running['var'] + 1e-5) * bn['scale'] + bn['bias']
  return _dense(params['Einsum_1'], jax.nn.relu(normed))


def _assert_trees_close(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_linear_probe_matches_loop_twin():
  # 300 examples: batches of 128, 128 and a ragged 44. 8 epochs: horizon 2,
  # so the learning rate runs 1, 0.5, 0, 0.5, 1, ... times 1e-2.
  train_x, train_y = _blobs(2, 300, noise=4.0)
  test_x, test_y = _blobs(3, 200, noise=4.0)
  key = jax.random.key(7)
  variables, result = probes.fit_head(
      probes.LinearHead(NUM_CLASSES), train_x, train_y, test_x, test_y, key=key, epochs=8,
      batch_size=128, learning_rate=1e-2, schedule='reference', shuffle=False)
  init = jax.jit(probes.LinearHead(NUM_CLASSES).init)(jax.random.split(key)[0], train_x[:1])
  params, _, accuracies = _twin_fit(
      init, _linear_loss, _linear_predict, train_x, train_y, test_x, test_y,
      learning_rate_at=lambda t: 1e-2 * (1 + jnp.cos(jnp.pi * t / 2)) / 2, epochs=8,
      batch_size=128)
  _assert_trees_close(variables['params'], params)
  assert result.per_epoch_test_accuracy == pytest.approx(accuracies)


def test_mlp_head_training_matches_pytorch_batchnorm_twin():
  # 10 epochs of 3 steps: the x0.1 drops fall at iterations 6 and 8.
  train_x, train_y = _blobs(4, 300, noise=4.0)
  test_x, test_y = _blobs(5, 200, noise=4.0)
  key = jax.random.key(8)
  variables, result = probes.fit_head(
      probes.MLPHead(NUM_CLASSES), train_x, train_y, test_x, test_y, key=key, epochs=10,
      batch_size=128, learning_rate=1e-2, schedule='multistep', shuffle=False)
  init = jax.jit(probes.MLPHead(NUM_CLASSES).init)(jax.random.split(key)[0], train_x[:1])
  params, stats, accuracies = _twin_fit(
      init, _torch_mlp_loss, _torch_mlp_predict, train_x, train_y, test_x, test_y,
      learning_rate_at=lambda t: 1e-2 * 0.1**((t >= 6).astype(jnp.float32) + (t >= 8)),
      epochs=10, batch_size=128)
  # The bias before BatchNorm gets a gradient of pure rounding noise, which
  # Adam scales up to full-size steps, so the two runs' values of it (and of
  # the running mean, which absorbs it) differ; BatchNorm removes it again.
  for name in ['BatchNorm_0', 'Einsum_1']:
    _assert_trees_close(variables['params'][name], params[name])
  _assert_trees_close(variables['params']['Einsum_0']['kernel'], params['Einsum_0']['kernel'])
  _assert_trees_close(variables['batch_stats']['BatchNorm_0']['var'], stats['BatchNorm_0']['var'])
  assert result.per_epoch_test_accuracy == pytest.approx(accuracies)


# One MLP-probe configuration for the tests below, so that they share a
# compilation: 256 labelled examples, 20 epochs of 8 steps, x0.1 drops after
# iterations 12 and 16.
_MLP_PROBE_ARGS = dict(label_fraction=0.5, epochs=20, batch_size=32, learning_rate=1e-2)


def test_mlp_probe_tests_each_example_with_running_statistics(blobs):
  train_x, train_y, test_x, test_y = blobs
  # Extra rows labelled -1 are never right. With running statistics they leave
  # the other rows' predictions alone; with test-batch statistics, far-away
  # rows would shift and rescale every row, while copies would not.
  never_right = np.full_like(test_y, -1)
  copies, far = np.concatenate([test_x, test_x]), np.concatenate([test_x, test_x + 50.0])
  labels = np.concatenate([test_y, never_right])
  key = jax.random.key(0)
  near = probes.mlp_probe(train_x, train_y, copies, labels, NUM_CLASSES, key=key,
                          **_MLP_PROBE_ARGS)
  mixed = probes.mlp_probe(train_x, train_y, far, labels, NUM_CLASSES, key=key,
                           **_MLP_PROBE_ARGS)
  assert near.last_test_accuracy > 45.0  # Over 90% of the real rows.
  assert mixed == near


def test_mlp_probe_trains_on_the_keyed_subset(blobs):
  train_x, train_y, test_x, test_y = blobs
  key = jax.random.key(3)
  subset_key, fit_key = jax.random.split(key)
  subset = np.asarray(probes.label_fraction_indices(subset_key, len(train_y), 0.5))
  args = dict(_MLP_PROBE_ARGS)
  del args['label_fraction']
  test_x, test_y = np.concatenate([test_x, test_x]), np.concatenate([test_y, test_y])
  _, want = probes.fit_head(probes.MLPHead(NUM_CLASSES), train_x[subset], train_y[subset],
                            test_x, test_y, key=fit_key, schedule='multistep', shuffle=False,
                            **args)
  got = probes.mlp_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, key=key,
                         **_MLP_PROBE_ARGS)
  assert got == want


# ---------------------------------------------------------------- behaviour


# One linear-probe configuration (10 epochs, reference schedule) for the tests
# below, so that they share a compilation; shuffling is a traced switch.
_LINEAR_PROBE_ARGS = dict(epochs=10, learning_rate=1e-2)


def test_linear_probe_separates_separable_data(blobs):
  result = probes.linear_probe(*blobs, NUM_CLASSES, key=jax.random.key(0), **_LINEAR_PROBE_ARGS)
  assert result.last_test_accuracy >= 99.0
  assert result.final_train_loss < 0.1


def test_linear_probe_is_at_chance_on_random_labels(blobs):
  rng = np.random.default_rng(5)
  train_x, _, test_x, _ = blobs
  result = probes.linear_probe(rng.permutation(train_x), rng.integers(NUM_CLASSES, size=512),
                               test_x, rng.integers(NUM_CLASSES, size=256), NUM_CLASSES,
                               key=jax.random.key(0), **_LINEAR_PROBE_ARGS)
  # Chance is 25%, with a standard deviation of 2.7% over 256 test examples.
  assert abs(result.last_test_accuracy - 100.0 / NUM_CLASSES) < 10.0


def test_shuffling_changes_the_order_and_still_learns(blobs):
  kwargs = dict(key=jax.random.key(0), **_LINEAR_PROBE_ARGS)
  shuffled = probes.linear_probe(*blobs, NUM_CLASSES, shuffle=True, **kwargs)
  fixed = probes.linear_probe(*blobs, NUM_CLASSES, shuffle=False, **kwargs)
  assert shuffled.last_test_accuracy >= 99.0
  assert shuffled.final_train_loss != fixed.final_train_loss


def test_cosine_epoch_probe_learns(blobs):
  result = probes.linear_probe(*blobs, NUM_CLASSES, key=jax.random.key(0),
                               schedule='cosine_epoch', shuffle=True, **_LINEAR_PROBE_ARGS)
  assert result.last_test_accuracy >= 99.0


def test_result_bookkeeping_and_determinism(blobs):
  train_x, train_y, test_x, test_y = blobs
  # Noisy features and an oversized learning rate make the test accuracy
  # wander between epochs.
  rng = np.random.default_rng(0)
  args = (train_x + rng.normal(scale=3.0, size=train_x.shape), train_y,
          test_x + rng.normal(scale=3.0, size=test_x.shape), test_y, NUM_CLASSES)
  kwargs = dict(_LINEAR_PROBE_ARGS, learning_rate=1.0)
  first = probes.linear_probe(*args, key=jax.random.key(1), **kwargs)
  again = probes.linear_probe(*args, key=jax.random.key(1), **kwargs)
  tied = probes.linear_probe(*args, key=jax.random.key(3), **kwargs)
  assert first == again
  assert first != tied
  for result in [first, tied]:
    accuracies = result.per_epoch_test_accuracy
    assert len(accuracies) == 10
    assert result.best_test_accuracy == max(accuracies)
    assert result.last_test_accuracy == accuracies[-1]
    assert result.best_epoch == accuracies.index(max(accuracies))
    # Accuracies are whole test examples out of 256.
    assert all(float(a * 256 / 100).is_integer() for a in accuracies)
  # The cases these seeds were picked for: a best epoch before the last one,
  # and a best accuracy reached at several epochs, the first of which counts.
  assert first.best_test_accuracy > first.last_test_accuracy
  assert tied.per_epoch_test_accuracy.count(tied.best_test_accuracy) > 1
  assert tied.best_epoch < 9


def _evaluation(result, epochs):
  entry = final._probe_entry(result, 512)
  models = {'final': {'round': 5, 'knn_accuracy': 90.0, 'linear': entry, 'mlp_10pct': None,
                      'mlp_1pct': None}}
  return {'probe_epochs': epochs, 'models': models, 'reference_numbers': None,
          'honest_numbers': None, 'notes': final.unlearned_notes(models, NUM_CLASSES)}


def test_a_probe_too_short_to_learn_says_so_next_to_its_accuracy(blobs):
  # Separable features, but 2 epochs of 4 batches are 8 Adam steps of at
  # most 1e-3 (every other one at 0, the reference cosine's horizon being 1):
  # the head barely leaves its random start.
  short = probes.linear_probe(*blobs, NUM_CLASSES, key=jax.random.key(0), epochs=2)
  assert short.steps == 2 * 4
  assert short.final_train_loss > np.log(NUM_CLASSES)
  table = final.format_table(_evaluation(short, 2))
  assert 'Adam steps per probe (2 epochs, batch 128): linear 8' in table
  note, = [line for line in table.splitlines() if line.startswith('note: ')]
  assert 'linear probe (final)' in note and 'after 8 Adam steps' in note
  assert 'more probe epochs' in note

  trained = probes.linear_probe(*blobs, NUM_CLASSES, key=jax.random.key(0), **_LINEAR_PROBE_ARGS)
  assert trained.steps == 10 * 4
  table = final.format_table(_evaluation(trained, 10))
  assert 'linear 40' in table and 'note: ' not in table


def test_label_fraction_subset_size_and_key():
  first = np.asarray(probes.label_fraction_indices(jax.random.key(0), 50_000, 0.01))
  again = np.asarray(probes.label_fraction_indices(jax.random.key(0), 50_000, 0.01))
  other = np.asarray(probes.label_fraction_indices(jax.random.key(1), 50_000, 0.01))
  assert first.shape == (500,)
  assert len(np.unique(first)) == 500
  assert first.min() >= 0 and first.max() < 50_000
  np.testing.assert_array_equal(first, again)
  assert len(np.intersect1d(first, other)) < 50
  assert probes.label_fraction_indices(jax.random.key(0), 50_000, 0.1).shape == (5000,)
  # Not sorted: the permuted order is the training order.
  assert np.any(np.diff(first) < 0)


def test_invalid_arguments_raise(blobs):
  with pytest.raises(ValueError):
    probes.label_fraction_indices(jax.random.key(0), 50, 0.01)
  with pytest.raises(ValueError):
    probes.linear_probe(*blobs, NUM_CLASSES, key=jax.random.key(0), schedule='multistep')


@pytest.mark.parametrize('head,shapes', [
    (probes.LinearHead(10), [(10, 512)]),
    (probes.MLPHead(10), [(512, 512), (10, 512)]),
])
def test_heads_start_xavier_uniform_with_zero_bias(head, shapes):
  params = jax.jit(head.init)(jax.random.key(0), jnp.zeros((1, 512)))['params']
  layers = [params[f'Einsum_{i}'] for i in range(len(shapes))]
  for layer, (fan_out, fan_in) in zip(layers, shapes):
    kernel = np.asarray(layer['kernel'])
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert kernel.shape == (fan_out, fan_in)
    assert 0.98 * bound < np.abs(kernel).max() <= bound
    assert np.std(kernel) == pytest.approx(bound / np.sqrt(3.0), rel=0.05)
    np.testing.assert_array_equal(layer['bias'], 0.0)
