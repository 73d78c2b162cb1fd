"""The exported client on the LiteRT interpreter: latency, memory, size and error.

    python experiments/edge_bench.py --width=1 --out experiments/results/edge_bench_cpu.json

For cut 1 and cut 2 at batch 1 and 20 (the reference's 5-client setting,
100 // 5 images per client and step), it exports the client five ways:

- ``trainable``: the export for training (weights, EMA and momentum in
  resource variables; infer, ema_infer, train, ema_update, get/set_weights);
- ``folded``: ``infer`` alone with the weights folded into constants (what a
  frozen client, or ``--infer_only``, exports);
- ``float16`` / ``int8``: ``folded`` with float16 or dynamic-range int8 weights;
- ``inputs``: ``infer`` with the weights passed as inputs on every call, the
  alternative to variables (measured only; not exported by the package).

Each model runs in a fresh process that imports only numpy, ai_edge_litert
and mocosfl_jax.edge.model (checked in its sys.modules), with 1 and 2
interpreter threads: the median of 50 calls of every signature after 3
warm-up calls, and the process's peak RSS (VmHWM) after running them all.
The interpreter does not expose its arena size in Python; the RSS after
loading the model and after its first calls stands in for it. Errors are
max |LiteRT - JAX| / max |JAX| of ``infer`` on the same random images.
Takes about 5 minutes at width 1 on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_file  # noqa: E402
from mocosfl_jax import config as config_lib  # noqa: E402
from mocosfl_jax.export import client as client_lib  # noqa: E402
from mocosfl_jax.export import export_client, litert  # noqa: E402
from mocosfl_jax.models import split  # noqa: E402

VARIANTS = ('trainable', 'folded', 'float16', 'int8', 'inputs')

# Runs in the edge-only process: argv = model path, threads, repeats.
EDGE_PROCESS = r'''
import json, statistics, sys, time
import numpy as np
from ai_edge_litert import interpreter as litert_interpreter
# Imported as the edge client imports it, so that the sys.modules check covers it.
from mocosfl_jax.edge.model import ClientModel  # noqa: F401

def rss_mb():
  # VmHWM, not ru_maxrss: the latter survives exec and so starts at the
  # peak of the benchmark process that forked this one.
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024

path, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
imports_mb = rss_mb()
interpreter = litert_interpreter.Interpreter(model_path=path, num_threads=threads)
runners = {n: interpreter.get_signature_runner(n) for n in interpreter.get_signature_list()}
loaded_mb = rss_mb()
rng = np.random.default_rng(0)
inputs = {n: {k: (rng.random(d['shape']) * (0.01 if k in ('lr', 'decay') else 1)).astype(d['dtype'])
              for k, d in r.get_input_details().items()} for n, r in runners.items()}
if 'get_weights' in runners:  # real weights, not noise, for set_weights
  inputs['set_weights'] = runners['get_weights']()
order = [n for n in ('infer', 'ema_infer', 'ema_update', 'train', 'get_weights', 'set_weights')
         if n in runners]
median_ms = {}
for name in order:
  for _ in range(3):
    runners[name](**inputs[name])
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    runners[name](**inputs[name])
    times.append(time.perf_counter() - tick)
  median_ms[name] = 1000 * statistics.median(times)
heavy = sorted(m for m in ('jax', 'jaxlib', 'tensorflow', 'flax', 'optax', 'orbax')
               if m in sys.modules)
print(json.dumps({'median_ms': median_ms, 'rss_imports_mb': imports_mb,
                  'rss_loaded_mb': loaded_mb, 'peak_rss_mb': rss_mb(), 'heavy_modules': heavy}))
'''


def config_for(cut: int, width: float) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.cut_layer = cut
  c.model.width = width
  c.data.name = 'cifar10'
  return c


def export_inputs_variant(config, online, path: str, batch: int) -> None:
  """``infer(images, online__...)``: the weights as inputs of every call."""
  tf, jax2tf = litert._tensorflow()  # pylint: disable=protected-access
  fns = client_lib.make(config)
  flat = client_lib.flatten(online)
  size = config.model.image_size

  @tf.function(autograph=False)
  def infer(images, **weights):
    online = {n: weights[litert.weight_name('online', n)] for n in flat}
    return {'smashed': jax2tf.convert(fns.forward, with_gradient=False)(online, images)}

  specs = {litert.weight_name('online', n): tf.TensorSpec(v.shape, tf.float32,
                                                          name=litert.weight_name('online', n))
           for n, v in flat.items()}
  concrete = infer.get_concrete_function(
      images=tf.TensorSpec((batch, size, size, 3), tf.float32, name='images'), **specs)
  with tempfile.TemporaryDirectory() as saved:
    tf.saved_model.save(tf.Module(), saved, signatures={'infer': concrete})
    model = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=['infer']).convert()
  with open(path, 'wb') as f:
    f.write(model)


def infer_error(path: str, config, online, batch: int) -> float:
  """max |LiteRT infer - JAX| / max |JAX| on random images."""
  from ai_edge_litert import interpreter as litert_interpreter  # pylint: disable=C0415
  size = config.model.image_size
  images = np.random.default_rng(1).random((batch, size, size, 3), np.float32)
  runner = litert_interpreter.Interpreter(model_path=path).get_signature_runner('infer')
  extra = {}
  if 'online__stem__Conv_0__kernel' in runner.get_input_details():
    extra = {litert.weight_name('online', n): np.asarray(v)
             for n, v in client_lib.flatten(online).items()}
  got = runner(images=images, **extra)['smashed']
  want = np.asarray(client_lib.make(config).forward(client_lib.flatten(online), images))
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def edge_process(path: str, threads: int, repeats: int) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run([sys.executable, '-c', EDGE_PROCESS, path, str(threads), str(repeats)],
                       capture_output=True, text=True, check=True, env=env, cwd=REPO)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--cuts', default='1,2')
  parser.add_argument('--batches', default='1,20')
  parser.add_argument('--threads', default='1,2')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--repeats', type=int, default=50)
  parser.add_argument('--out',
                      default=os.path.join(REPO, 'experiments/results/edge_bench_cpu.json'))
  args = parser.parse_args()
  import ai_edge_litert  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  results = results_file.new(jax=jax.__version__, tensorflow=tf.__version__,
                             ai_edge_litert=getattr(ai_edge_litert, '__version__', '2.3.0'),
                             width=args.width, repeats=args.repeats)
  folder = tempfile.mkdtemp(prefix='edge_bench_')
  for cut in map(int, args.cuts.split(',')):
    config = config_for(cut, args.width)
    net, _ = split.build(config)
    online = jax.tree.map(np.asarray, net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[
        'params'])
    momentum = jax.tree.map(np.zeros_like, online)
    for batch in map(int, args.batches.split(',')):
      for variant in args.variants.split(','):
        path = os.path.join(folder, f'c{cut}_b{batch}_{variant}.tflite')
        if variant == 'inputs':
          export_inputs_variant(config, online, path, batch)
        else:
          quantize = variant if variant in litert.QUANTIZE else 'none'
          export_client(config, online, online, momentum, path, batch=batch, quantize=quantize,
                        trainable=variant == 'trainable')
        for threads in map(int, args.threads.split(',')):
          run = {'cut': cut, 'batch': batch, 'variant': variant, 'threads': threads,
                 'size_bytes': os.path.getsize(path),
                 'infer_error': infer_error(path, config, online, batch),
                 **edge_process(path, threads, args.repeats)}
          results_file.add_run(results, run, args.out)


if __name__ == '__main__':
  main()
