"""A short training run of the real step (augmentation included) lowers the loss.

The logged loss of a real run is no measure of this in a few steps: it is
taken against a queue that fills with keys of ever newer models, and on the
digits it can rise for a while as kNN accuracy climbs (spec 12: about 0.7 at
step 1, rising as real keys arrive). So the run here trains on one fixed
problem: the same images under the same augmentation draw every step, against
a queue held at keys of other images from the initial EMA model.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mocosfl_jax.data import augment, sources
from mocosfl_jax.models import split
from mocosfl_jax.sfl import moco, optim, state as state_lib, step as step_lib

import tiny
import twins

CLIENTS, BATCH, QUEUE, STEPS, T, LR = 4, 4, 64, 20, 0.1, 0.06


def test_short_training_run_lowers_the_loss():
  images = jnp.asarray(sources.load_split(
      ml_collections.ConfigDict({'source': 'digits'}), 'train').images)
  mean, std = sources.normalization('digits')
  pair = augment.make_pair_augment('mocov2', mean, std, 32, crop_scale=(0.3, 1.0))
  client_net = split.ClientNet(1, 0.0625, as_matmul=True, depth=tiny.DEPTH)
  server_net = split.ServerNet(1, 0.0625, 'V2', depth=tiny.DEPTH)
  tx = optim.sgd(0.9, 5e-4)
  # Every program here is compiled unoptimised (twins.quick_jit): for 20 steps
  # of this size that costs less than optimising, and it computes the same.
  train_step = twins.quick_jit(step_lib.make_train_step(
      client_net, server_net, tx, tx, pair, temperature=T, ema_decay=0.99, client_impl='vmap',
      server_lr=lambda rnd: LR, client_lr=lambda steps, rnd: jnp.full(steps.shape, LR)))
  # Compiled: op by op, every random draw of the initialisation compiles on its own.
  state = twins.quick_jit(functools.partial(
      state_lib.init_state, client_net=client_net, server_net=server_net, server_tx=tx,
      client_tx=tx, num_clients=CLIENTS, image_size=32, queue_size=QUEUE,
      feature_sharing=True))(jax.random.key(0))

  @twins.quick_jit
  def initial_keys(x):
    client = {'params': jax.tree.map(lambda p: p[0], state.clients.ema)}
    smashed = client_net.apply(client, pair(jax.random.key(2), x)[1])
    return moco.l2_normalize(step_lib.server_apply(server_net, state.server_ema, smashed)[0])
  queue = state.queue.replace(keys=initial_keys(images[-QUEUE:]))
  batch = images[:CLIENTS * BATCH].reshape((CLIENTS, BATCH) + images.shape[1:])

  losses = []
  for _ in range(STEPS):
    state, metrics = train_step(state.replace(queue=queue), batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  # The initial head outputs are nearly parallel: each term is close to
  # ln(1 + K), the positive no closer than the negatives.
  np.testing.assert_allclose(losses[0], 2 * np.log(1 + QUEUE), rtol=0.05)
  assert np.all(np.diff(losses) < 0), losses
  assert losses[-1] < 0.25 * losses[0], losses
