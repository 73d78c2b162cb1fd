"""experiments/edge_runtime_bench.py's byte accounting, through a real EdgeHub on 127.0.0.1."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import edge_runtime_bench as bench  # noqa: E402

SHAPE = (2, 4, 4, 3)  # batch 2 of 4x4x3 smashed data
SHAPES = {'stem__Conv_0__kernel': (3, 3, 3, 4), 'stem__GroupNorm_0__scale': (4,)}
# Protobuf's bytes around one tensor (tags, lengths, shape, dtype, seq) plus gRPC's prefix.
FRAMING = 40


def test_measured_bytes_are_the_tensors_plus_framing():
  measured = bench.measure_wire(SHAPE, SHAPES, steps=4, sync_every=2, frozen=False)
  rates = bench.per_step_and_sync(measured)
  tensor = 4 * int(np.prod(SHAPE))
  model = 4 * sum(int(np.prod(shape)) for shape in SHAPES.values())
  step, sync = rates['per_step'], rates['per_sync']
  assert 2 * tensor < step['smashed_up'] <= 2 * (tensor + FRAMING)  # online and EMA views
  assert tensor < step['gradient_down'] <= tensor + FRAMING
  assert 0 < step['step_request_down'] <= FRAMING
  # Up: the online model, a tensor per parameter, named; down: the online average.
  names = sum(len(f'online__{name}') + FRAMING for name in SHAPES)
  assert model < sync['weights_up'] <= model + names
  assert model < sync['average_down'] <= model + names
  assert measured['syncs'] == 2 and set(measured['wire']['up']) == {'smashed', 'weights'}
  # TCP carries the messages and HTTP/2's frames around them.
  up = sum(measured['wire']['up'].values())
  assert up <= measured['tcp_sent'] <= up + 64 * (measured['steps'] + measured['syncs']) + 1024


def test_frozen_clients_send_smashed_data_only():
  measured = bench.measure_wire(SHAPE, SHAPES, steps=3, sync_every=2, frozen=True)
  rates = bench.per_step_and_sync(measured)
  assert set(measured['wire']['up']) == {'smashed'}
  assert set(measured['wire']['down']) == {'step_request'}
  assert rates['per_step']['gradient_down'] == rates['per_sync']['weights_up'] == 0
  assert measured['connection']['down']['welcome'] > 4 * sum(
      int(np.prod(shape)) for shape in SHAPES.values())  # the model, once


@pytest.mark.parametrize('events,steps,syncs', [
    ([('smashed', 0, 0.0, 0.1), ('gradients', 0, 0.2, 0.3), ('smashed', 1, 1.0, 1.1),
      ('gradients', 1, 1.2, 1.3), ('weights', None, 1.4, 1.5), ('average', None, 1.5, 1.6),
      ('smashed', 2, 2.5, 2.6)], [1.0], [0.2]),
])
def test_step_times_leave_out_the_steps_with_a_sync(events, steps, syncs):
  times = bench.step_times(events)
  np.testing.assert_allclose(times['steps'], steps)
  np.testing.assert_allclose(times['exchange'], [0.2])
  np.testing.assert_allclose(times['sync'], syncs)
