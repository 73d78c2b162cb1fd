"""experiments/scale.py's per-client bytes, from shapes alone."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))

import scale  # noqa: E402

# Client parameters at full width (README "Usage"): the stem at cut 1, the stem and one block at 2.
CLIENT_PARAMETERS = {1: 1856, 2: 75840}


def test_a_clients_share_is_its_online_ema_and_momentum_models_and_little_else():
  for cut, parameters in CLIENT_PARAMETERS.items():
    share = scale.client_share_bytes(cut, 1.0, queue_size=64)
    models = 3 * parameters * 4  # online, EMA and SGD momentum, float32
    assert models <= share <= models + 64, (cut, share, models)


def test_the_queue_is_not_per_client():
  assert scale.client_share_bytes(1, 0.0625, 64) == scale.client_share_bytes(1, 0.0625, 4096)
