"""What the whole session shares: a persistent compilation cache and the tiny run.

Tests in different modules, and the command lines that some of them start,
compile many of the same programs: every run of the tiny config (tiny.py)
compiles the same initialisation, round, embedding and kNN programs. With one
persistent cache for the session, the first compiles each and the others load
it; JAX keys it on the program, the compiler options and the jaxlib, so what
loads is what would have compiled. The cache is new for each session, so the
suite's time is that of a clean clone, and pytest-xdist's workers and every
subprocess find it through the environment.
"""
import os
import shutil
import tempfile

import jax
import pytest

from mocosfl_jax import train

import tiny

CACHE_DIR_ENV = 'JAX_COMPILATION_CACHE_DIR'
# Every program: the small ones are what the command-line subprocesses compile most.
MIN_COMPILE_TIME_ENV = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'


def pytest_configure(config):
  # xdist's workers inherit the main process's environment.
  if not hasattr(config, 'workerinput'):
    config.compilation_cache_dir = tempfile.mkdtemp(prefix='mocosfl-jax-test-cache-')
    os.environ[CACHE_DIR_ENV] = config.compilation_cache_dir
    os.environ[MIN_COMPILE_TIME_ENV] = '0'
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


# Test modules whose tests share the tiny run, kept in one pytest-xdist worker
# so that it runs once.
SHARED_GROUPS = {'test_evaluate': 'tiny_run', 'test_resume': 'tiny_run'}


def pytest_collection_modifyitems(config, items):
  """With pytest-xdist, each module's tests run in one worker, as its compiled fixtures are."""
  if not config.pluginmanager.hasplugin('xdist'):
    return
  for item in items:
    module = item.module.__name__
    item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(module, module)))
