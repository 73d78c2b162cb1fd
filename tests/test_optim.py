"""Learning-rate schedules against PyTorch's definitions, written out."""
import bisect

import numpy as np
import pytest

from mocosfl_jax.sfl import optim


@pytest.mark.parametrize('num_epochs, gamma', [(200, 0.1), (10, 0.2), (1, 0.2)])
def test_multistep_is_pytorchs_multisteplr(num_epochs, gamma):
  # MultiStepLR(milestones=[int(0.6 n), int(0.8 n)]): base x gamma^(milestones <= t).
  milestones = sorted([int(0.6 * num_epochs), int(0.8 * num_epochs)])
  schedule = optim.multistep(0.06, num_epochs, gamma)
  for t in range(2 * num_epochs + 2):
    expected = 0.06 * gamma ** bisect.bisect_right(milestones, t)
    np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6, err_msg=f't={t}')


def test_reference_schedule_choice():
  assert optim.schedule_kind('auto', 'V1') == 'multistep'
  assert optim.schedule_kind('auto', 'largeV2') == 'cosine'
  assert optim.schedule_kind('multistep', 'V2') == 'multistep'
