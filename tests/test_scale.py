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
    # A bfloat16 EMA halves one of the three models.
    half = scale.client_share_bytes(cut, 1.0, queue_size=64, ema_dtype='bfloat16')
    assert share - half == parameters * 2, (cut, share, half)


def test_the_queue_is_not_per_client():
  assert scale.client_share_bytes(1, 0.0625, 64) == scale.client_share_bytes(1, 0.0625, 4096)


def test_the_plot_has_one_line_per_population(tmp_path):
  runs = [{'population': n, 'pool': p, 'width': 0.0625, 'step_seconds': p / n}
          for n in (1000, 10000) for p in (10, 100, 1000)]
  results = {'backend': 'cpu', 'runs': runs[::-1]}
  lines = scale.plot_figure(results).axes[0].lines
  assert [line.get_label() for line in lines] == ['1,000 clients', '10,000 clients']
  assert [list(line.get_xdata()) for line in lines] == [[10, 100, 1000]] * 2
  assert list(lines[1].get_ydata()) == [0.001, 0.01, 0.1]
  path = scale.write_plot(results, str(tmp_path / 'scale.png'))
  assert (tmp_path / 'scale.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert path == str(tmp_path / 'scale.png')


def test_limits_take_the_fixed_bytes_and_the_per_client_and_per_active_client_slopes():
  # total = 100 fixed + 10 per client + 3 per active client, at every cut
  memory = [{'cut_layer': cut, 'population': 20, 'pool': pool, 'temp_bytes': 50 + 3 * pool,
             'total_bytes': 100 + 10 * 20 + 3 * pool} for cut in (1, 2, 3) for pool in (2, 6)]
  shares = [{'cut_layer': cut, 'width': 1.0, 'bytes': 10} for cut in (1, 2, 3)]
  limit = scale.limits(memory, shares, populations=(30,), pools=(4,))[0]
  assert (limit['fixed_bytes'], limit['client_share_bytes'], limit['per_active_client_bytes']) \
      == (100, 10, 3)
  # 24e9 bytes less 100 fixed and 4 active clients' 12, over 10 a client
  assert limit['clients_that_fit']['cpu_24gb'] == {'4': (24_000_000_000 - 112) // 10}
  assert limit['pool_that_fits']['gpu_80gb'] == {'30': (80_000_000_000 - 400) // 3}
