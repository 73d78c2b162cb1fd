"""What the whole session shares: quick compiles, a persistent compilation cache and the tiny run.

Tests in different modules, and the command lines that some of them start,
compile many of the same programs: every run of the tiny config (tiny.py)
compiles the same initialisation, round, embedding and kNN programs. With one
persistent cache for the session, the first compiles each and the others load
it; JAX keys it on the program, the compiler options and the jaxlib, so what
loads is what would have compiled. The cache is new for each session, so the
suite's time is that of a clean clone, and pytest-xdist's workers and every
subprocess find it through the environment.

Every program is compiled unoptimised and without XLA:CPU's fusion emitters
(QUICK_COMPILE_FLAGS, those of them that the installed jaxlib knows): the
suite's programs run a few times on tiny inputs, so XLA's optimisations cost
more than they save.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

from mocosfl_jax import train

import tiny

HERE = pathlib.Path(__file__).parent

CACHE_DIR_ENV = 'JAX_COMPILATION_CACHE_DIR'
# Set to 0, the cache keeps every program, the many small ones too.
MIN_COMPILE_TIME_ENV = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
# The first two: about a fifth less CPU time for test_hetero, test_learning
# and test_attack (198 -> 151 and 187 -> 149 CPU seconds, 2-core Xeon,
# 2026-12-03). Without the fusion emitters (XLA:CPU's MLIR code generation of
# fusions) the whole suite then took a quarter less (717 -> 525 test seconds,
# 649 -> 485 CPU seconds, 369 -> 276 s wall; 2-core AMD EPYC, 2026-12-04).
QUICK_COMPILE_FLAGS = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
                       ' --xla_cpu_use_fusion_emitters=false')


def _xla_accepts(flags: list[str]) -> bool:
  """Whether this jaxlib's XLA knows ``flags``: it aborts the process on an unknown one."""
  env = {**os.environ, 'XLA_FLAGS': ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]),
         'JAX_PLATFORMS': 'cpu'}
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                         capture_output=True, text=True, check=False)
  return 'Unknown flag in XLA_FLAGS' not in probe.stderr


def quick_compile_flags(config) -> list[str]:
  """QUICK_COMPILE_FLAGS that this jaxlib knows; a warning names any it does not.

  XLA renames and retires its flags, and the test extra does not pin jaxlib.
  """
  flags = QUICK_COMPILE_FLAGS.split()
  if _xla_accepts(flags):
    return flags
  known = [flag for flag in flags if _xla_accepts([flag])]
  config.issue_config_time_warning(pytest.PytestConfigWarning(
      f'this jaxlib\'s XLA does not know {" ".join(sorted(set(flags) - set(known)))}: '
      'the suite compiles without it and takes longer'), stacklevel=2)
  return known


def pytest_configure(config):
  # xdist's workers inherit the main process's environment.
  if not hasattr(config, 'workerinput'):
    config.compilation_cache_dir = tempfile.mkdtemp(prefix='mocosfl-jax-test-cache-')
    os.environ[CACHE_DIR_ENV] = config.compilation_cache_dir
    os.environ[MIN_COMPILE_TIME_ENV] = '0'
    # Read when JAX first starts its CPU client, which no import has done yet.
    os.environ['XLA_FLAGS'] = ' '.join(
        [os.environ.get('XLA_FLAGS', ''), *quick_compile_flags(config)]).strip()
  # Imported above, JAX has read the environment already.
  jax.config.update('jax_compilation_cache_dir', os.environ[CACHE_DIR_ENV])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def pytest_unconfigure(config):
  if getattr(config, 'compilation_cache_dir', None):
    shutil.rmtree(config.compilation_cache_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """A finished tiny run with its probes: (workdir, summary). Tests copy it to change it."""
  workdir = tmp_path_factory.mktemp('tiny_run')
  summary = train.run(tiny.config(**{'eval.final_probes': True}), workdir)
  return workdir, summary


@pytest.fixture(scope='session')
def sharded_runs(tmp_path_factory):
  """The directory of tests/sharded_run.py's runs on 1 and 8 devices (its docstring).

  test_multihost's two processes compare with its one-device run.
  """
  directory = tmp_path_factory.mktemp('sharded_runs')
  subprocess.run([sys.executable, str(HERE / 'sharded_run.py'), str(directory)], check=True,
                 env=dict(os.environ), cwd=HERE)
  return directory


# With pytest-xdist (`-n 2`), each group's tests run in one worker, so that the
# compiled programs a module caches and the tiny run are built once: a group is
# a test module, but the modules that share the tiny run make one group, and
# so do those that share the sharded runs.
SHARED_GROUPS = {'test_evaluate': 'tiny_run', 'test_resume': 'tiny_run',
                 'test_taressfl': 'tiny_run', 'test_attack': 'tiny_run', 'test_sharding': 'mesh',
                 'test_multihost': 'mesh'}
# The slowest groups start first, so that the workers finish together (in a
# run of the whole suite, 2026-12-04, 2-core AMD EPYC: the tiny run's group
# about 100 and the mesh's about 60 test seconds, then test_edge_demo,
# test_hetero, the GPU kit's, test_ressfl and test_step about 50 to 25 each,
# the others less; a group missing here starts after these).
SLOWEST_FIRST = ('tiny_run', 'mesh', 'test_edge_demo', 'test_hetero', 'test_gpu_check',
                 'test_ressfl', 'test_step', 'test_export', 'test_sweep', 'test_remote_step',
                 'test_serve', 'test_bottleneck', 'test_augment', 'test_rounds',
                 'test_mixed_precision', 'test_learning', 'test_ema_dtype', 'test_probes',
                 'test_models', 'test_edge_runtime')


def group(nodeid: str) -> str:
  module = pathlib.PurePath(nodeid.split('::', 1)[0]).stem
  return SHARED_GROUPS.get(module, module)


def _rank(nodeid: str) -> int:
  name = group(nodeid)
  return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config, items):
  # In a worker: the order the scheduler hands out the groups in.
  if hasattr(config, 'workerinput'):
    items.sort(key=lambda item: _rank(item.nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """xdist's scheduling by scope (as --dist loadfile), with the scope a group.

  Whatever --dist says. Not xdist_group marks: with pytest 9.2, xdist 3.8 can no
  longer rename the tests by their group, and they spread over the workers.
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class GroupScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return group(nodeid)

  config.option.loadscopereorder = False  # keep the order above, not the largest groups first
  return GroupScheduling(config, log)
