"""Export to LiteRT: the .tflite signatures against the engine's JAX client, and the CLI.

One module fixture converts cut 1 and cut 2 (width 1/8, batch 2) once; each
test opens its own interpreter on those files, so no test sees another's
train steps.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import evaluate
from mocosfl_jax.data import sources
from mocosfl_jax.edge.client import EdgeClient
from mocosfl_jax.edge.model import ClientModel
from mocosfl_jax.evaluation import final
from mocosfl_jax.export import __main__ as export_main
from mocosfl_jax.export import client as client_lib
from mocosfl_jax.export import export_client, litert, sidecar
from mocosfl_jax.export import workdir as workdir_lib
from mocosfl_jax.models import split
from mocosfl_jax.sfl import optim
import tiny

BATCH = 2
CUTS = (1, 2)
# One step: LiteRT and XLA differ by float rounding only.
ONE_STEP = 1e-5
# Ten steps: 8e-7 here, but a ReLU input within rounding of zero can flip and
# the paths part: up to 1e-2 of the update at cut 2 (design/edge-notes.md).
TEN_STEPS = 2e-2
# Error of the quantized inference models relative to the largest smashed value
# (measured 4.5e-4 and 7.6e-3).
QUANTIZED_ERROR = {'float16': 5e-3, 'int8': 1e-1}


def small_config(cut, client_lr=-1.0):
  c = config_lib.default_config()
  c.cut_layer = cut
  c.model.width = 0.125  # 8 channels: two GroupNorm groups
  c.model.image_size = 16
  c.data.name = 'cifar10'  # per-channel normalisation statistics
  c.optim.client_lr = client_lr
  return c


def random_like(key, tree, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([np.asarray(leaf + scale * jax.random.normal(k, leaf.shape))
                            for k, leaf in zip(keys, leaves)])


def initial_weights(config, seed):
  """(online, ema, momentum): three different trees, as after some training."""
  net, _ = split.build(config)
  size = config.model.image_size
  online = jax.tree.map(np.asarray, net.init(jax.random.key(seed),
                                             jnp.zeros((1, size, size, 3)))['params'])
  ema = random_like(jax.random.key(seed + 1), online, 0.05)
  momentum = random_like(jax.random.key(seed + 2), jax.tree.map(np.zeros_like, online), 0.01)
  return online, ema, momentum


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """cut -> (config, (online, ema, momentum), model path, sidecar) of a trainable export."""
  folder = tmp_path_factory.mktemp('export')
  models = {}
  for cut in CUTS:
    config = small_config(cut)
    weights = initial_weights(config, seed=10 * cut)
    path = folder / f'client_c{cut}.tflite'
    described = export_client(config, *weights, path, batch=BATCH, step=5)
    models[cut] = config, weights, path, described
  return models


# ---------------------------------------------------------------------------
# The engine's side, for reference.

def engine_forward(config, params, images):
  """The engine's client module on float images in [0, 1], normalised as augment does."""
  net, _ = split.build(config)
  mean, std = sources.normalization(config.data.name)
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return net.apply({'params': params}, x)


_ENGINE_UPDATES = {}


def engine_client_update(config, params, opt_state, images, smashed_grad, lr):
  """One client update as sfl/step.py does it: VJP of the smashed data, then optim.sgd."""
  tx = optim.sgd(config.optim.momentum, config.optim.weight_decay)

  def update(params, opt_state, images, smashed_grad, lr):
    _, vjp = jax.vjp(lambda p: engine_forward(config, p, images), params)
    (grads,) = vjp(smashed_grad)
    opt_state = optim.with_learning_rate(opt_state, lr)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Compiled once per cut: op by op, ten steps of it take longer than the export.
  if config.cut_layer not in _ENGINE_UPDATES:
    _ENGINE_UPDATES[config.cut_layer] = jax.jit(update)
  return _ENGINE_UPDATES[config.cut_layer](params, opt_state, images, smashed_grad, lr)


def engine_opt_state(config, params, momentum):
  tx = optim.sgd(config.optim.momentum, config.optim.weight_decay)
  return optax.tree_utils.tree_set(tx.init(params), trace=momentum)


def named(group, tree):
  return {litert.weight_name(group, n): np.asarray(v)
          for n, v in client_lib.flatten(tree).items()}


def images(seed, config, batch=BATCH):
  size = config.model.image_size
  return np.random.default_rng(seed).random((batch, size, size, 3), np.float32)


def relative_error(got, want, scale=None):
  """max |got - want| / max |scale| (``want`` when None), over a whole tree of arrays."""
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  scale = want if scale is None else jax.tree.leaves(scale)
  error = max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got, want))
  return error / max(float(np.max(np.abs(np.asarray(s)))) for s in scale)


# ---------------------------------------------------------------------------
# Signatures against the engine.

@pytest.mark.parametrize('cut', CUTS)
def test_infer_and_ema_infer_match_the_jax_client(exported, cut):
  config, (online, ema, _), path, described = exported[cut]
  model = ClientModel(str(path))
  x = images(0, config)
  smashed = model.infer(x)
  want = engine_forward(config, online, x)
  assert smashed.shape == (BATCH,) + model.smashed_shape == want.shape
  assert relative_error(smashed, want) < ONE_STEP
  assert relative_error(model.ema_infer(x), engine_forward(config, ema, x)) < ONE_STEP
  assert described['signatures']['infer']['outputs']['smashed']['shape'] == list(want.shape)


@pytest.mark.parametrize('cut', CUTS)
def test_one_train_step_matches_the_engine_client_update(exported, cut):
  config, (online, ema, momentum), path, _ = exported[cut]
  model = ClientModel(str(path))
  x = images(1, config)
  grad = np.random.default_rng(2).normal(size=(BATCH,) + model.smashed_shape).astype(np.float32)
  lr = 0.1
  assert model.train(x, grad, lr) == 6  # the export's step 5, plus one
  want, opt_state = engine_client_update(config, online, engine_opt_state(config, online, momentum),
                                         x, grad, lr)
  got = model.get_weights()
  update = jax.tree.map(lambda a, b: a - b, want, online)
  assert relative_error({k: got[k] for k in named('online', want)},
                        named('online', want), update) < ONE_STEP
  new_momentum = client_lib.momentum_of(opt_state)
  assert relative_error({k: got[k] for k in named('momentum', new_momentum)},
                        named('momentum', new_momentum)) < ONE_STEP
  # The EMA model is not the train step's business.
  assert all(np.array_equal(got[k], v) for k, v in named('ema', ema).items())
  assert relative_error(model.infer(x), engine_forward(config, want, x)) < ONE_STEP


@pytest.mark.parametrize('cut', CUTS)
def test_ten_steps_with_ema_updates_track_the_engine(exported, cut):
  config, (online, ema, momentum), path, _ = exported[cut]
  model = ClientModel(str(path))
  rng = np.random.default_rng(3)
  decay = config.moco.ema_decay
  params, opt_state = online, engine_opt_state(config, online, momentum)
  for step in range(10):
    x = images(10 + step, config)
    grad = rng.normal(size=(BATCH,) + model.smashed_shape).astype(np.float32)
    lr = 0.1 * (1 - step / 10)
    # The engine's order: the EMA moves from the pre-step online weights.
    assert model.ema_update(decay) == 5 + step
    ema = optax.incremental_update(params, ema, 1.0 - decay)
    assert model.train(x, grad, lr) == 6 + step
    params, opt_state = engine_client_update(config, params, opt_state, x, grad, lr)
  got = model.get_weights()
  update = jax.tree.map(lambda a, b: a - b, params, online)
  assert relative_error({k: got[k] for k in named('online', params)},
                        named('online', params), update) < TEN_STEPS
  assert relative_error({k: got[k] for k in named('ema', ema)}, named('ema', ema)) < ONE_STEP


@pytest.mark.parametrize('cut', CUTS)
def test_with_a_zero_gradient_the_optimiser_is_the_engines_to_rounding(exported, cut):
  config, (online, _, momentum), path, _ = exported[cut]
  model = ClientModel(str(path))
  params, opt_state = online, engine_opt_state(config, online, momentum)
  x, zero = images(4, config), np.zeros((BATCH,) + model.smashed_shape, np.float32)
  for lr in (0.5, 0.25, 0.125):
    model.train(x, zero, lr)
    params, opt_state = engine_client_update(config, params, opt_state, x, zero, lr)
  got = model.get_weights()
  update = jax.tree.map(lambda a, b: a - b, params, online)
  # Weight decay and momentum only: the rounding of p + update in float32
  # (measured 6e-7 of the update).
  assert relative_error({k: got[k] for k in named('online', params)},
                        named('online', params), update) < 5e-6


@pytest.mark.parametrize('cut', CUTS)
def test_set_weights_then_infer_is_the_jax_model_with_those_weights(exported, cut):
  config, (online, ema, momentum), path, _ = exported[cut]
  model = ClientModel(str(path))
  new_online = random_like(jax.random.key(7), online, 0.1)
  model.set_weights(named('online', new_online))  # a partial set keeps the rest
  x = images(5, config)
  assert relative_error(model.infer(x), engine_forward(config, new_online, x)) < ONE_STEP
  got = model.get_weights()
  want = {**named('online', new_online), **named('ema', ema), **named('momentum', momentum)}
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_edge_client_step_through_the_export_is_the_engines(exported):
  """EdgeClient (views, EMA order, schedule) over the real LiteRT model, against the engine."""
  config, (online, ema, momentum), path, _ = exported[2]
  size = config.model.image_size
  data = np.random.default_rng(5).integers(0, 256, (7, size, size, 3), dtype=np.uint8)
  edge = EdgeClient(ClientModel(str(path)), data, seed=3, steps=5)
  view1, view2 = edge.views(5)
  query, key = edge.forward()
  assert relative_error(query, engine_forward(config, online, view1)) < ONE_STEP
  decay = config.moco.ema_decay
  ema = optax.incremental_update(online, ema, 1.0 - decay)
  assert relative_error(key, engine_forward(config, ema, view2)) < ONE_STEP
  grad = np.random.default_rng(6).normal(size=query.shape).astype(np.float32)
  lr = edge.apply_gradient(grad, round_index=3)
  want_lr = float(optim.learning_rates(config)[1](jnp.asarray(5), 3))
  assert lr == pytest.approx(want_lr, rel=1e-6)
  want, _ = engine_client_update(config, online, engine_opt_state(config, online, momentum),
                                 view1, grad, want_lr)
  got = edge.get_weights()
  update = jax.tree.map(lambda a, b: a - b, want, online)
  assert relative_error({k: got[k] for k in named('online', want)},
                        named('online', want), update) < ONE_STEP
  assert edge.steps == 6


def test_weight_names_are_the_flax_paths_under_three_groups(exported):
  _, (online, _, _), path, _ = exported[2]
  names = set(ClientModel(str(path)).get_weights())
  paths = {'__'.join(p) for p in
           (tuple(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(online))}
  assert names == {f'{g}__{p}' for g in ('online', 'ema', 'momentum') for p in paths}
  assert 'online__layer1_block1__Conv_0__kernel' in names


# ---------------------------------------------------------------------------
# The model file and its sidecar.

def test_models_hold_builtin_ops_only_and_no_conditionals(exported):
  for _, _, path, described in exported.values():
    ops = sidecar.ops(path.read_bytes())
    assert described['ops'] == ops
    assert not [op for op in ops if op.startswith('CUSTOM') or 'Flex' in op]
    # compilation.materialize would be an IF per boundary.
    assert 'IF' not in ops and 'CONV_2D' in ops


def test_sidecar_describes_the_device_side(exported):
  config, _, path, described = exported[1]
  assert json.loads(path.with_suffix('.json').read_text()) == described
  assert described['cut_layer'] == 1 and described['batch'] == BATCH
  assert described['trainable'] and described['quantize'] == 'none'
  assert described['normalization'] == {'mean': list(sources.normalization('cifar10')[0]),
                                         'std': list(sources.normalization('cifar10')[1])}
  assert described['optimizer'] == {
      'momentum': 0.9, 'weight_decay': 5e-4, 'client_lr': config.optim.lr,
      'schedule': 'cosine', 'client_schedule': 'per_round', 'num_rounds': config.num_rounds,
      'multistep_gamma': 0.2, 'ema_decay': 0.99}
  assert described['augmentation'] == {'version': 'mocov2', 'crop_scale_min': 0.08}
  assert set(described['signatures']) == {'infer', 'ema_infer', 'train', 'ema_update',
                                          'get_weights', 'set_weights'}
  assert described['signatures']['train']['inputs']['lr'] == {'shape': [1], 'dtype': 'float32'}
  assert described['signatures']['train']['outputs']['step'] == {'shape': [1], 'dtype': 'int32'}
  assert described['size_bytes'] == path.stat().st_size
  assert described['source'] is None


def test_wrong_inputs_are_one_line_errors_naming_the_signature_and_shape(exported):
  config, _, path, _ = exported[1]
  model = ClientModel(str(path))
  x = images(0, config)
  with pytest.raises(ValueError, match=r'infer: images must be float32 of shape \(2, 16, 16, 3\)'):
    model.infer(x[:1])
  with pytest.raises(ValueError, match='got float64'):
    model.infer(x.astype(np.float64))
  with pytest.raises(ValueError, match='train: smashed_grad must be float32 of shape'):
    model.train(x, np.zeros((BATCH, 3), np.float32), 0.1)
  with pytest.raises(ValueError, match='unknown weight names online__nope'):
    model.set_weights({'online__nope': np.zeros(3, np.float32)})


def test_a_frozen_client_exports_a_weights_folded_infer_only(tmp_path):
  config = small_config(1, client_lr=0.0)
  online, ema, momentum = initial_weights(config, seed=3)
  path = tmp_path / 'frozen.tflite'
  described = export_client(config, online, ema, momentum, path, batch=BATCH)
  assert set(described['signatures']) == {'infer'} and not described['trainable']
  model = ClientModel(str(path))
  assert not model.trainable
  x = images(6, config)
  assert relative_error(model.infer(x), engine_forward(config, online, x)) < ONE_STEP
  with pytest.raises(ValueError, match='train: this model is inference-only'):
    model.train(x, np.zeros((BATCH,) + model.smashed_shape, np.float32), 0.1)
  assert 'READ_VARIABLE' not in described['ops']
  with pytest.raises(litert.ExportError, match='frozen'):
    export_client(config, online, ema, momentum, tmp_path / 'x.tflite', batch=BATCH,
                  trainable=True)


@pytest.mark.parametrize('quantize', ('float16', 'int8'))
def test_quantized_inference_models_stay_within_their_error_bound(tmp_path, quantize):
  config = small_config(2)
  # The converter leaves tensors under 1024 elements in float32: 16 channels
  # make the block kernels (2304 elements) the quantized ones.
  config.model.width = 0.25
  online, ema, momentum = initial_weights(config, seed=4)
  path = tmp_path / 'q.tflite'
  described = export_client(config, online, ema, momentum, path, batch=BATCH, quantize=quantize)
  assert set(described['signatures']) == {'infer'} and described['quantize'] == quantize
  x = images(8, config)
  error = relative_error(ClientModel(str(path)).infer(x), engine_forward(config, online, x))
  assert ONE_STEP < error < QUANTIZED_ERROR[quantize]
  with pytest.raises(litert.ExportError, match='inference-only'):
    export_client(config, online, ema, momentum, path, batch=BATCH, quantize=quantize,
                  trainable=True)


def test_a_missing_export_extra_is_one_line_naming_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(litert.ExportError, match=r"pip install -e '\.\[export\]'"):
    litert._tensorflow()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# The command line on a run's workdir.

@pytest.fixture(scope='module')
def run_workdir(tmp_path_factory):
  """A workdir with a round-3 checkpoint of random clients and a best-kNN model of round 2."""
  workdir = tmp_path_factory.mktemp('run')
  config = config_lib.resolved(tiny.config())
  # Random values of the run's state shapes: a real checkpoint without compiling an init.
  abstract = jax.eval_shape(workdir_lib.init_state(config), jax.random.key(0))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype),
                       abstract)
  state = state.replace(round=jnp.asarray(3, jnp.int32), clients=state.clients.replace(
      steps=jnp.arange(7, 7 + config.num_clients, dtype=jnp.int32)))
  checkpoints = checkpoint.Checkpoints(workdir, keep=1)
  checkpoints.save(state, 3, config, {})
  checkpoints.close()
  final.BestKnnModel(workdir).save(final.eval_model(state), 2, 50.0, config)
  return workdir, config, state


def test_the_command_exports_client_0_of_the_latest_checkpoint(run_workdir):
  workdir, config, state = run_workdir
  path, described = export_main.run(workdir)
  assert path == workdir / 'export' / f'client_c1_b{config.batch_size}.tflite'
  assert json.loads(path.with_suffix('.json').read_text()) == described
  assert described['source'] == {'workdir': str(workdir.absolute()), 'checkpoint': 'latest',
                                 'round': 3, 'client_steps': 7}
  model = ClientModel(str(path))
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
  c = state.clients
  want = {**named('online', first(c.online)), **named('ema', first(c.ema)),
          **named('momentum', first(client_lib.momentum_of(c.opt)))}
  got = model.get_weights()
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)
  x = images(9, config, config.batch_size)
  assert model.train(x, np.zeros((config.batch_size,) + model.smashed_shape, np.float32),
                     0.01) == 8


def test_the_command_exports_the_best_knn_model_for_inference(run_workdir, tmp_path):
  workdir, config, state = run_workdir
  out = tmp_path / 'best.tflite'
  path, described = export_main.run(workdir, 'best', out=str(out), batch=3, infer_only=True)
  assert path == out and set(described['signatures']) == {'infer'}
  assert described['source']['round'] == 2 and described['batch'] == 3
  online = jax.tree.map(lambda x: np.asarray(x[0]), state.clients.online)
  x = images(10, config, 3)
  assert relative_error(ClientModel(str(out)).infer(x),
                        engine_forward(config, online, x)) < ONE_STEP
  client = workdir_lib.load(workdir, 'best')
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(client.ema),
                                                  jax.tree.leaves(online)))
  assert all(not np.any(m) for m in jax.tree.leaves(client.momentum))


@pytest.mark.parametrize('selection, message', [
    ('9', r'--checkpoint=9: use all, latest, best or one of the saved rounds \[3\]'),
    ('all', '--checkpoint=all: export one model'),
])
def test_the_command_rejects_a_checkpoint_it_cannot_export(run_workdir, selection, message):
  workdir, _, _ = run_workdir
  with pytest.raises(evaluate.EvaluationError, match=message):
    export_main.run(workdir, selection)
