"""The key queue and the InfoNCE loss."""
import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax.sfl import moco

import twins

# Compiled, unoptimised: op by op, every operation of every shape compiles on its own.
enqueue = twins.quick_jit(moco.enqueue, static_argnames='num_clients')
info_nce = twins.quick_jit(moco.info_nce)


def test_shared_queue_wraps_around_in_reference_order():
  queue = moco.Queue(jnp.zeros((5, 1)), jnp.array(3, jnp.int32))
  k1, k2 = jnp.array([[1.], [2.]]), jnp.array([[3.], [4.]])
  queue = enqueue(queue, k1, k2, num_clients=2)
  # [k1; k2] = 1, 2, 3, 4 written at rows 3, 4, 0, 1.
  np.testing.assert_array_equal(queue.keys[:, 0], [3, 4, 0, 1, 2])
  assert int(queue.ptr) == 2


def test_per_client_queues_receive_only_their_own_keys():
  queue = moco.init_queue(jax.random.key(0), 8, 2, num_clients=2)  # 4 keys per client
  assert queue.keys.shape == (2, 4, 2)
  np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=-1), 1.0, rtol=1e-6)
  k1 = jnp.array([[10., 0], [11, 0], [20, 0], [21, 0]])   # client 0: rows 0-1, client 1: rows 2-3
  k2 = jnp.array([[12., 0], [13, 0], [22, 0], [23, 0]])
  queue = enqueue(queue, k1, k2, num_clients=2)
  np.testing.assert_array_equal(queue.keys[0, :, 0], [10, 11, 12, 13])
  np.testing.assert_array_equal(queue.keys[1, :, 0], [20, 21, 22, 23])
  np.testing.assert_array_equal(queue.ptr, [0, 0])


def test_asymmetric_loss_enqueues_the_key_views_keys_only():
  shared = enqueue(moco.Queue(jnp.zeros((5, 1)), jnp.array(4, jnp.int32)), None,
                   jnp.array([[3.], [4.]]), num_clients=2)
  np.testing.assert_array_equal(shared.keys[:, 0], [4, 0, 0, 0, 3])
  assert int(shared.ptr) == 1
  per_client = moco.Queue(jnp.zeros((2, 3, 1)), jnp.zeros((2,), jnp.int32))
  per_client = enqueue(per_client, None, jnp.array([[12.], [13], [22], [23]]), num_clients=2)
  np.testing.assert_array_equal(per_client.keys[:, :, 0], [[12, 13, 0], [22, 23, 0]])
  np.testing.assert_array_equal(per_client.ptr, [2, 2])


def test_reference_loss_choice_and_collapse_value():
  assert not moco.is_symmetric('auto', 'V1') and moco.is_symmetric('auto', 'V2')
  assert moco.is_symmetric('symmetric', 'V1') and not moco.is_symmetric('asymmetric', 'V2')
  np.testing.assert_allclose(moco.collapse_value(6000), 17.40, atol=0.005)
  np.testing.assert_allclose(moco.collapse_value(6000, symmetric=False), 8.70, atol=0.005)


def test_info_nce_matches_cross_entropy_by_hand():
  key = jax.random.key(1)
  q = moco.l2_normalize(jax.random.normal(key, (4, 3)))
  k = moco.l2_normalize(jax.random.normal(jax.random.key(2), (4, 3)))
  negatives = moco.l2_normalize(jax.random.normal(jax.random.key(3), (6, 3)))
  loss, _ = info_nce(q, k, negatives, 0.1)
  q, k, negatives = map(np.asarray, (q, k, negatives))
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ negatives.T], 1) / 0.1
  expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_per_client_negatives_come_from_the_own_queue_only():
  q = moco.l2_normalize(jax.random.normal(jax.random.key(4), (4, 3)))
  k = moco.l2_normalize(jax.random.normal(jax.random.key(5), (4, 3)))
  queues = moco.l2_normalize(jax.random.normal(jax.random.key(6), (2, 5, 3)))
  loss, _ = info_nce(q, k, queues, 0.2)
  loss0, _ = info_nce(q[:2], k[:2], queues[0], 0.2)
  loss1, _ = info_nce(q[2:], k[2:], queues[1], 0.2)
  np.testing.assert_allclose(float(loss), (float(loss0) + float(loss1)) / 2, rtol=1e-5)


def test_collapse_value_is_two_log_k_plus_one():
  np.testing.assert_allclose(moco.collapse_value(6000), 17.40, atol=0.01)
