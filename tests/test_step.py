"""The vmapped MocoSFL step against its per-client Python loop twin (tests/twins.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.models import split
from mocosfl_jax.sfl import optim, state as state_lib, step as step_lib

import tiny
import twins

N_POOL, BATCH, SIZE, QUEUE = 3, 2, 8, 16   # 2nB = 12 keys per step: step 2 wraps the queue
LR, MOMENTUM, WD, T, TAU, ROUNDS = 0.05, 0.9, 5e-4, 0.1, 0.99, 7
TX = optim.sgd(MOMENTUM, WD)


def fixed_views(key, images):
  """A key-independent stand-in for augmentation so both sides see the same pixels."""
  x = images.astype(jnp.float64) / 255.0 - 0.5
  return x, x[..., ::-1, :] * 0.9


def build(cut_layer, impl):
  """(the engine's client, the server, the twin's client).

  The twin's client runs native convolutions whatever the engine uses: the same
  parameters, an independent formulation, and one twin program per cut layer.
  """
  client = split.ClientNet(cut_layer, width=0.125, as_matmul=impl == 'matmul', depth=tiny.DEPTH)
  server = split.ServerNet(cut_layer, width=0.125, moco_version='smallV2', depth=tiny.DEPTH)
  return client, server, split.ClientNet(cut_layer, width=0.125, depth=tiny.DEPTH)


def make_engine(client, server, impl, symmetric=True):
  train_step = step_lib.make_train_step(
      client, server, TX, TX, fixed_views, temperature=T, ema_decay=TAU,
      client_impl='map' if impl == 'map' else 'vmap',
      server_lr=optim.cosine_per_epoch(LR, ROUNDS),
      client_lr=lambda steps, rnd: optim.reference_client_cosine(LR, ROUNDS)(steps),
      symmetric=symmetric)
  # Unoptimised: it runs twice, so compiling it fully optimised would cost
  # more than it saves; optimisations must not change its results anyway.
  return twins.quick_jit(train_step)


def unstack(tree, n):
  return [jax.tree.map(lambda x: x[j], tree) for j in range(n)]


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=1e-11, err_msg=what)


@functools.cache
def initial_state(cut_layer):
  """A float64 pool state with distinct clients, EMAs and schedule positions, so a
  mixed-up row shows; the same for every client implementation of a cut layer."""
  _, server, client = build(cut_layer, 'vmap')
  return pool_state(client, server)


def pool_state(client, server):
  """``initial_state`` of given client and server modules."""

  def init(key):
    return twins.distinct_pool(state_lib.init_state(
        key, client, server, TX, TX, num_clients=N_POOL, image_size=SIZE, queue_size=QUEUE,
        feature_sharing=True))
  # One compiled program: run eagerly, every random draw of every parameter
  # shape compiled on its own, most of this test's time when it did.
  with jax.enable_x64(True):
    return twins.quick_jit(init)(jax.random.key(0))


# Each cut layer, client implementation and loss form is in some case: cut 1
# and 2; vmap, map and vmap over the matmul form; symmetric and asymmetric.
# The loss form changes the server's side only, so it need not meet every
# client implementation, nor the implementation every cut (a compiled case
# costs 20-40 s of the suite).
@pytest.mark.parametrize('cut_layer,impl,symmetric', [
    (1, 'vmap', True), (1, 'map', False), (2, 'matmul', True)])
def test_vmapped_step_equals_per_client_loop(cut_layer, impl, symmetric):
  with jax.enable_x64(True):
    client, server, twin_client = build(cut_layer, impl)
    train_step = make_engine(client, server, impl, symmetric)
    state = initial_state(cut_layer)
    clients = state.clients

    twin = dict(online=unstack(clients.online, N_POOL), ema=unstack(clients.ema, N_POOL),
                bufs=[jax.tree.map(jnp.zeros_like, p) for p in unstack(clients.online, N_POOL)],
                client_steps=[0, 3, 9], server=state.server['params'],
                server_ema=state.server_ema['params'],
                server_buf=jax.tree.map(jnp.zeros_like, state.server['params']),
                queue=np.asarray(state.queue.keys), ptr=0)
    rng = np.random.default_rng(0)
    for step in range(2):
      images = jnp.asarray(rng.integers(0, 256, (N_POOL, BATCH, SIZE, SIZE, 3), np.uint8))
      state, metrics = train_step(state, images, jax.random.key(step))
      twin_out = twins.twin_step(
          twin_client, server, fixed_views(None, images), online=twin['online'],
          ema=twin['ema'], bufs=twin['bufs'], client_steps=twin['client_steps'],
          server=twin['server'], server_ema=twin['server_ema'], server_buf=twin['server_buf'],
          queue=twin['queue'], ptr=twin['ptr'], round_index=2, num_rounds=ROUNDS, lr=LR,
          momentum=MOMENTUM, weight_decay=WD, temperature=T, tau=TAU, symmetric=symmetric)
      twin.update(twin_out)

      np.testing.assert_allclose(float(metrics['loss']), twin['loss'], rtol=1e-10)
      np.testing.assert_allclose(float(metrics['contrastive_accuracy']), twin['accuracy'])
      for j in range(N_POOL):
        assert_close(jax.tree.map(lambda x: x[j], state.clients.online), twin['online'][j],
                     f'client {j} online params after step {step}')
        assert_close(jax.tree.map(lambda x: x[j], state.clients.ema), twin['ema'][j],
                     f'client {j} EMA params after step {step}')
      assert_close(state.server['params'], twin['server'], 'server params')
      assert_close(state.server_ema['params'], twin['server_ema'], 'server EMA params')
      np.testing.assert_allclose(np.asarray(state.queue.keys), twin['queue'], rtol=1e-10)
      assert int(state.queue.ptr) == twin['ptr']
    keys_per_step = (2 if symmetric else 1) * N_POOL * BATCH
    assert twin['ptr'] == (2 * keys_per_step) % QUEUE  # symmetric: wrapped around once
    np.testing.assert_array_equal(state.clients.steps, twin['client_steps'])


def test_each_client_gets_its_own_gradient_slice():
  """Gradients routed through the batched VJP equal each client's own VJP of its rows."""
  with jax.enable_x64(True):
    client, _, _ = build(1, 'vmap')

    # Compiled, each a program: run eagerly, every operation compiles on its own.
    @twins.quick_jit
    def inputs(key):
      params = client.init(key, jnp.zeros((1, SIZE, SIZE, 3)))['params']
      stacked = jax.tree.map(
          lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), (N_POOL,) + x.shape), params)
      x = jax.random.normal(jax.random.key(2), (N_POOL, BATCH, SIZE, SIZE, 3))
      out = jax.eval_shape(step_lib.batched_client_apply(client, 'vmap'), stacked, x)
      return stacked, x, jax.random.normal(jax.random.key(3), out.shape)

    @twins.quick_jit
    def batched_grads(stacked, x, cotangent):
      forward = step_lib.batched_client_apply(client, 'vmap')
      return jax.vjp(lambda p: forward(p, x), stacked)[1](cotangent)[0]

    stacked, x, cotangent = inputs(jax.random.key(0))
    grads = batched_grads(stacked, x, cotangent)
    for j in range(N_POOL):
      mine = jax.tree.map(lambda t: t[j], stacked)
      assert_close(jax.tree.map(lambda t: t[j], grads),
                   twins.client_grads(client, mine, x[j], cotangent[j]), f'client {j}')
