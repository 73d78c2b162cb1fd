"""The model-inversion attack (spec 6.1): metrics, decoder, protocol, command line."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from mocosfl_jax import attack as attack_cli
from mocosfl_jax import config as config_lib
from mocosfl_jax import evaluate
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data import sources
from mocosfl_jax.privacy import attack, decoders
from mocosfl_jax.privacy import metrics as privacy_metrics
from test_evaluate import NUM_ROUNDS, REPO, finished_run  # pylint: disable=unused-import

SIZE = 16
# Small enough for seconds on a CPU; every attack below shares one compiled epoch.
SETTINGS = attack.Settings(data_fraction=1.0, val_fraction=0.1, epochs=6, batch_size=16,
                           lr=3e-3, channels=8, test_images=32, seed=0)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def textured(n: int, seed: int) -> np.ndarray:
  """uint8 images with structure at every scale of the SSIM window."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (n, SIZE // 2, SIZE // 2, 3), dtype=np.uint8)
  return np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.BILINEAR))
                   for c in coarse])


def space_to_depth(x):
  """The identity up to a reshaping: 2x2 pixel blocks become 12 channels at half the size."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, h // 2, w // 2, 4 * c)


def constant(x):
  """A client that forgets its input: the same smashed data shape, all zeros."""
  return jnp.zeros((x.shape[0], SIZE // 2, SIZE // 2, 12))


TRAIN, TEST = textured(256, 0), textured(64, 1)


# ---------------------------------------------------------------------------
# Metrics against their plain definitions


def numpy_ssim(a: np.ndarray, b: np.ndarray, padding: str) -> float:
  """SSIM of one HWC pair: per channel, an 11x11 Gaussian window (sigma 1.5), mean of the map.

  'zero': the window slides over the image zero-padded by 5 (pytorch_ssim's
  conv2d(padding=5)); 'valid': only where it fits inside the image.
  """
  x = np.arange(11) - 5
  g = np.exp(-x**2 / (2 * 1.5**2))
  g /= g.sum()
  window = np.outer(g, g)

  def blur(z):
    if padding == 'zero':
      z = np.pad(z, 5)
    return np.einsum('ijkl,kl->ij', sliding_window_view(z, (11, 11)), window)

  c1, c2 = 0.01**2, 0.03**2
  maps = []
  for ch in range(a.shape[-1]):
    x1, x2 = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
    mu1, mu2 = blur(x1), blur(x2)
    var1, var2 = blur(x1 * x1) - mu1**2, blur(x2 * x2) - mu2**2
    cov = blur(x1 * x2) - mu1 * mu2
    maps.append((2 * mu1 * mu2 + c1) * (2 * cov + c2)
                / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2)))
  return float(np.mean(maps))


def test_metrics_match_their_numpy_definitions():
  rng = np.random.default_rng(0)
  images = textured(3, 7) / 255.0
  others = np.stack([np.clip(images[0] + rng.normal(0, 0.1, images[0].shape), 0, 1),
                     np.full_like(images[1], 0.5), rng.uniform(size=images[2].shape)])
  got = jax.device_get(privacy_metrics.per_image(jnp.asarray(others, jnp.float32),
                                                 jnp.asarray(images, jnp.float32)))
  mse = np.mean((others - images)**2, axis=(1, 2, 3))
  np.testing.assert_allclose(got['mse'], mse, rtol=1e-5)
  np.testing.assert_allclose(got['psnr'], 10 * np.log10(1 / mse), rtol=1e-5)
  np.testing.assert_allclose(got['ssim'], [numpy_ssim(o, i, 'zero') for o, i in
                                           zip(others, images)], atol=1e-5)
  np.testing.assert_allclose(got['ssim_valid'], [numpy_ssim(o, i, 'valid') for o, i in
                                                 zip(others, images)], atol=1e-5)
  # The reference's zero padding scores a grey image far above 0 (metrics' docstring).
  assert got['ssim'][1] > 0.3 and abs(got['ssim_valid'][1]) < 0.1
  same = privacy_metrics.ssim(jnp.asarray(images, jnp.float32), jnp.asarray(images, jnp.float32))
  np.testing.assert_allclose(same, 1.0, atol=1e-5)


# ---------------------------------------------------------------------------
# The decoder


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('smashed_shape,params', [
    # By hand: R(64->64) = 2 BN(64) + 2 conv 3x3 64->64 with bias = 74,112;
    # R(64->3) = BN(64) + conv 64->3 + BN(3) + conv 3->3 + 1x1 shortcut + BN(3) = 2,147.
    ((32, 32, 64), 7 * 74_112 + 2_147),  # cut 1 at width 1: R, 4 R, 2 R stages, R(64->3)
    # C4S2: R(4->64) = 39,816; a transposed conv 64->64 with bias and BN = 37,056.
    ((16, 16, 4), 39_816 + 4 * 74_112 + 37_056 + 74_112 + 2_147),
])
def test_decoder_has_the_reference_layers(smashed_shape, params):
  decoder = decoders.ResNormDecoder(image_size=32)
  smashed = jax.ShapeDtypeStruct((2, *smashed_shape), jnp.float32)
  out, variables = jax.eval_shape(lambda s: decoder.init_with_output(
      jax.random.key(0), s, train=False), smashed)
  assert out.shape == (2, 32, 32, 3)
  assert count(variables['params']) == params


def test_decoder_upsamples_by_transposed_convs_to_the_image_size():
  decoder = decoders.ResNormDecoder(image_size=16, channels=4)
  init = lambda s: decoder.init_with_output(jax.random.key(0), s)
  for size, stages in ((16, 0), (8, 1), (4, 2), (1, 4)):
    assert decoders.upsampling_stages(size, 16) == stages
    out, variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, size, size, 2), jnp.float32))
    assert out.shape == (1, 16, 16, 3)
    assert sum(name.startswith('ConvTranspose') for name in variables['params']) == stages
  for size in (3, 5, 32):
    with pytest.raises(ValueError, match='power of 2'):
      decoders.upsampling_stages(size, 16)


# ---------------------------------------------------------------------------
# The protocol


def test_pairs_and_test_images_are_seeded_disjoint_draws():
  settings = attack.Settings()
  train_rows, val_rows = attack.draw_pairs(50_000, settings)
  assert (len(train_rows), len(val_rows)) == (450, 50)
  assert not set(train_rows) & set(val_rows)
  again = attack.draw_pairs(50_000, settings)
  np.testing.assert_array_equal(train_rows, again[0])
  np.testing.assert_array_equal(val_rows, again[1])
  other = attack.draw_pairs(50_000, attack.Settings(seed=1))
  assert set(other[0]) != set(train_rows)
  # A tiny training set still gets one pair of each kind.
  assert [len(r) for r in attack.draw_pairs(10, settings)] == [1, 1]
  test_rows = attack.draw_test(10_000, settings)
  assert len(test_rows) == 128 == len(set(test_rows))
  np.testing.assert_array_equal(test_rows, attack.draw_test(10_000, settings))
  assert len(attack.draw_test(20, settings)) == 20


@pytest.fixture(scope='module')
def identity_attack():
  return attack.attack(space_to_depth, TRAIN, TEST, MEAN, STD, SETTINGS)


def test_a_client_that_keeps_its_input_is_inverted(identity_attack):
  result, originals, reconstructions = identity_attack
  m = result['metrics']
  assert m['ssim'] > 0.9 and m['ssim_valid'] > 0.85
  assert m['mse'] < 0.01 and m['psnr'] > 20
  assert result['data'] == {'train_pairs': 230, 'validation_pairs': 26, 'test_images': 32,
                            'smashed_shape': [8, 8, 12], 'image_shape': [SIZE, SIZE, 3]}
  history = result['validation']
  assert len(history['validation_mse']) == SETTINGS.epochs
  assert history['best_validation_mse'] == min(history['validation_mse'])
  # The kept epoch is the best one (the decoder still improves at 6 epochs).
  assert history['best_epoch'] > SETTINGS.epochs // 2
  np.testing.assert_allclose(originals, TEST[attack.draw_test(len(TEST), SETTINGS)] / 255.0,
                             atol=1e-6)
  assert reconstructions.shape == originals.shape
  assert 0 < reconstructions.min() and reconstructions.max() < 1  # sigmoid


def test_a_client_that_outputs_constants_is_not_inverted(identity_attack):
  m = attack.attack(constant, TRAIN, TEST, MEAN, STD, SETTINGS)[0]['metrics']
  assert abs(m['ssim_valid']) < 0.1
  # The reference's SSIM scores borders even for a constant guess (see metrics).
  assert m['ssim'] < identity_attack[0]['metrics']['ssim'] - 0.3
  assert m['mse'] > 2 * identity_attack[0]['metrics']['mse']


def test_at_end_writes_the_files_and_returns_the_summary_entry(tmp_path):
  config = config_lib.default_config()
  for name, value in {**dataclasses.asdict(SETTINGS), 'epochs': 2}.items():
    config.privacy[f'attack_{name}'] = value
  config.num_rounds = 3
  labels = lambda images: np.zeros(len(images), np.int32)
  exp = types.SimpleNamespace(
      config=config, client_net=types.SimpleNamespace(apply=lambda v, x: space_to_depth(x)),
      train=sources.Split(TRAIN, labels(TRAIN), ('0',)),
      test=sources.Split(TEST, labels(TEST), ('0',)))
  state = types.SimpleNamespace(clients=types.SimpleNamespace(online={'w': jnp.zeros((4, 1))}))
  result = attack.at_end(exp, state, tmp_path)
  assert result['checkpoint'] == {'workdir': str(tmp_path), 'checkpoint': 'final', 'round': 3}
  assert result['settings']['epochs'] == 2
  assert json.loads((tmp_path / attack.RESULT_FILENAME).read_text()) == result
  with Image.open(tmp_path / attack.IMAGE_FILENAME) as png:
    # 8 tiles of 16 x 4 = 64 pixels, 2 px gaps; originals above reconstructions.
    assert png.size == (8 * 66 + 2, 2 * 64 + 6)


# ---------------------------------------------------------------------------
# The command line on a real run


def test_command_writes_attack_json_and_png(finished_run):
  workdir, _ = finished_run
  shown = []
  result = attack_cli.run(workdir, 'latest', {'attack_epochs': 2, 'attack_channels': 8,
                                              'attack_test_images': 16}, show=shown.append)
  assert shown == [result]
  assert json.loads((workdir / attack.RESULT_FILENAME).read_text()) == result
  assert result['checkpoint']['round'] == NUM_ROUNDS
  assert result['checkpoint']['checkpoint'] == 'latest'
  assert result['data']['test_images'] == 16
  assert result['data']['smashed_shape'][:2] == [32, 32]
  assert all(np.isfinite(v) for v in result['metrics'].values())
  with Image.open(workdir / attack.IMAGE_FILENAME) as png:
    assert png.size == (8 * 66 + 2, 2 * 64 + 6)
  assert 'MSE' in attack_cli.describe(result)


def test_command_rejects_bad_selections_and_settings(finished_run, tmp_path):
  workdir, _ = finished_run
  with pytest.raises(evaluate.EvaluationError, match='the attack evaluates one model'):
    attack_cli.run(workdir, 'all')
  kept = rf'\[{NUM_ROUNDS - 2}, {NUM_ROUNDS - 1}, {NUM_ROUNDS}\]'
  with pytest.raises(evaluate.EvaluationError, match='saved rounds ' + kept):
    attack_cli.run(workdir, '1')
  with pytest.raises(ConfigError, match='privacy.attack_val_fraction is 1.0'):
    attack_cli.run(workdir, 'latest', {'attack_val_fraction': 1.0})
  with pytest.raises(evaluate.EvaluationError, match='no directory'):
    attack_cli.run(tmp_path / 'absent')


def test_command_line_prints_one_error_line_for_an_empty_workdir(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(
      [sys.executable, '-m', 'mocosfl_jax.attack', f'--workdir={tmp_path}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path} holds no checkpoint (none in {tmp_path}/checkpoints)')
  assert not (tmp_path / attack.RESULT_FILENAME).exists()
