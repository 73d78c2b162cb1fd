"""The command lines' mistakes and interruptions: one line each, no traceback.

Flag and config-file mistakes are parsed in-process (``cli.parse_flags`` on
fresh flags); a few subprocesses check that ``main`` is wired to it and that
nothing else (orbax's threads, a crash) prints after the line. Each of those
stops before anything compiles: about 3 s, most of it importing JAX.
"""
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

from absl import flags
from ml_collections import config_flags
import pytest

import mocosfl_jax
from mocosfl_jax import checkpoint
from mocosfl_jax import cli
from mocosfl_jax import metrics

# ml_collections loads config files with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

REPO = pathlib.Path(mocosfl_jax.__file__).parent.parent
QUICKSTART = str(REPO / 'configs' / 'quickstart.py')
# A directory that nobody, root included, may create files in: chmod does not
# stop root, whom the tests may run as.
UNWRITABLE = '/sys'


def _parse_error(*args: str) -> str:
  """The message with which ``cli.parse_flags`` exits on ``prog *args``."""
  argv = ['prog', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Workdir.', flag_values=flag_values)
  with pytest.raises(SystemExit) as exited:
    cli.parse_flags(argv, flag_values=flag_values, config_flag='config')
  message = exited.value.code
  assert isinstance(message, str) and '\n' not in message  # status 1, one line
  return message


def test_unknown_override_fields_name_the_closest_valid_ones():
  assert _parse_error(f'--config={QUICKSTART}', '--config.data.sourcee=npz') == (
      'error: unknown config field data.sourcee (--config.data.sourcee): '
      'did you mean data.source or data.aux_source?')
  assert 'did you mean moco.queue_size?' in _parse_error(f'--config={QUICKSTART}',
                                                         '--config.moco.queue_sise=10')
  # A field given without its section.
  assert 'did you mean optim.lr?' in _parse_error(f'--config={QUICKSTART}', '--config.lr=1')
  # Nothing near: the fields at that level.
  message = _parse_error(f'--config={QUICKSTART}', '--config.no_such_field=1')
  assert message.startswith('error: unknown config field no_such_field (--config.no_such_field): '
                            'the fields are auto_adjust, batch_size, checkpoint,')
  assert 'the fields of data are data.aux_balance,' in _parse_error(f'--config={QUICKSTART}',
                                                                  '--config.data.foo=1')


def test_override_values_of_the_wrong_type():
  assert _parse_error(f'--config={QUICKSTART}', '--config.num_clients=abc') == (
      "error: --config.num_clients=abc: num_clients takes an int, not 'abc'")
  assert _parse_error(f'--config={QUICKSTART}', '--config.optim.lr=fast') == (
      "error: --config.optim.lr=fast: optim.lr takes a float, not 'fast'")


def test_config_files_that_are_missing_or_broken(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert _parse_error('--config=absent.py') == (
      f'error: --config=absent.py: no such file in {tmp_path}')
  # With an override, ml_collections fails on the override instead.
  assert _parse_error(f'--config={tmp_path}/absent.py', '--config.seed=1') == (
      f'error: --config={tmp_path}/absent.py: no such file')
  assert _parse_error(f'--config={tmp_path}') == (
      f'error: --config={tmp_path} is a directory, not a config file')
  (tmp_path / 'syntax.py').write_text('def get_config():\n  return (\n')
  assert _parse_error('--config=syntax.py') == (
      "error: --config=syntax.py does not parse: '(' was never closed (line 2)")
  (tmp_path / 'raises.py').write_text('def get_config():\n  return {}["seed"]\n')
  assert _parse_error('--config=raises.py') == (
      "error: --config=raises.py: get_config() fails: KeyError: 'seed' (line 2)")
  (tmp_path / 'empty.py').write_text('')
  assert _parse_error('--config=empty.py') == 'error: --config=empty.py defines no get_config()'


def test_other_flag_mistakes_keep_absl_s_message():
  assert _parse_error(f'--config={QUICKSTART}', '--workdirr=x') == (
      "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?")


def test_a_good_command_line_parses(tmp_path):
  argv = ['prog', f'--config={QUICKSTART}', '--config.seed=3', f'--workdir={tmp_path}', 'rest']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Workdir.', flag_values=flag_values)
  assert cli.parse_flags(argv, flag_values=flag_values, config_flag='config') == ['prog', 'rest']
  assert flag_values.config.seed == 3


def test_output_directories_that_cannot_be_written(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = {
      a_file: f'--workdir={a_file} is a file, not a directory',
      a_file / 'run': f'--workdir={a_file}/run lies under {a_file}, which is a file',
      pathlib.Path(UNWRITABLE): f'--workdir={UNWRITABLE} is not writable (',
      pathlib.Path(UNWRITABLE) / 'run' / 'a': (
          f'--workdir={UNWRITABLE}/run/a cannot be created in {UNWRITABLE} ('),
  }
  for path, message in cases.items():
    with pytest.raises(cli.OutputPathError) as error:
      cli.check_output_dir(path, f'--workdir={path}')
    assert str(error.value).startswith(message)
  cli.check_output_dir(tmp_path, 'ok')
  cli.check_output_dir(tmp_path / 'new' / 'run', 'ok')
  assert not (tmp_path / 'new').exists()  # checked, not created
  assert os.listdir(tmp_path) == ['a_file']  # no probe file left behind


def test_output_files_that_cannot_be_written(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = {
      tmp_path: f'--out={tmp_path} is a directory',
      tmp_path / 'no' / 'x.png': f'--out={tmp_path}/no/x.png: no directory {tmp_path}/no',
      a_file / 'x.png': f'--out={a_file}/x.png lies under {a_file}, which is a file',
      pathlib.Path(UNWRITABLE) / 'x.png': (
          f'--out={UNWRITABLE}/x.png cannot be written: {UNWRITABLE} is not writable ('),
  }
  for path, message in cases.items():
    with pytest.raises(cli.OutputPathError) as error:
      cli.check_output_file(path, f'--out={path}')
    assert str(error.value).startswith(message)
  cli.check_output_file(a_file, 'ok')  # overwriting a file is fine


def test_json_outputs_get_the_usual_mode(tmp_path):
  previous = os.umask(0o022)
  try:
    metrics.write_json(str(tmp_path / 'summary.json'), {'a': 1})
  finally:
    os.umask(previous)
  assert (tmp_path / 'summary.json').stat().st_mode & 0o777 == 0o644
  assert os.listdir(tmp_path) == ['summary.json']


def test_closed_checkpoints_leave_no_thread_at_work(tmp_path):
  """Checkpoints closed before any save (a data error) left orbax's clean-up of
  unfinished saves running; at exit it printed a traceback after the error line."""
  unfinished = tmp_path / checkpoint.CHECKPOINT_DIR / '3.orbax-checkpoint-tmp'
  unfinished.mkdir(parents=True)
  before = set(threading.enumerate())
  checkpoint.Checkpoints(tmp_path, keep=1).close()
  assert not unfinished.exists()
  # asyncio's idle executor workers end quietly at exit.
  left = [t.name for t in set(threading.enumerate()) - before
          if not t.name.startswith('asyncio_')]
  assert not left


def _main(*args, cwd=REPO, **popen):
  return subprocess.Popen([sys.executable, '-m', 'mocosfl_jax.main', *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize('args, expected', [
    ([f'--config={QUICKSTART}', '--config.data.sourcee=npz', '--workdir=unused'],
     'error: unknown config field data.sourcee (--config.data.sourcee): '
     'did you mean data.source or data.aux_source?'),
    # An empty data folder: the error comes after orbax has started.
    ([f'--config={QUICKSTART}', '--config.data.source=npz', '--config.data.name=cifar10',
      '--config.data.path={tmp}', '--workdir={tmp}/run'],
     'error: {tmp}/train.npz does not exist: data.path must be a folder holding '
     'train.npz and test.npz'),
    ([f'--config={QUICKSTART}', '--workdir={tmp}/run/metrics.jsonl/x'],
     'error: --workdir={tmp}/run/metrics.jsonl/x lies under {tmp}/run/metrics.jsonl, '
     'which is a file'),
])
def test_main_prints_one_error_line_and_nothing_else(tmp_path, args, expected):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'metrics.jsonl').write_text('')
  process = _main(*(a.format(tmp=tmp_path) for a in args))
  _, stderr = process.communicate(timeout=120)
  assert (process.returncode, stderr) == (1, expected.format(tmp=tmp_path) + '\n')


def test_ctrl_c_while_main_imports_jax_is_one_line_and_status_130(tmp_path):
  """Python's KeyboardInterrupt here crashed the interpreter (status -11)."""
  # A command inherits an ignored SIGINT (and keeps ignoring it, as main
  # should); from a shell it starts with the default. Once in a clean-clone
  # run an earlier test in the same worker had left it ignored.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    process = _main(f'--config={QUICKSTART}', f'--workdir={tmp_path}')
  finally:
    signal.signal(signal.SIGINT, previous)
  maps = pathlib.Path(f'/proc/{process.pid}/maps')
  deadline = time.monotonic() + 60
  # jaxlib's libraries are mapped while JAX is imported, after the handler is set.
  while 'jaxlib' not in maps.read_text():
    assert time.monotonic() < deadline
    with pytest.raises(subprocess.TimeoutExpired):  # the command still runs
      process.wait(timeout=0.005)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGINT
  assert stderr == ('stopped by SIGINT; run the same command again to resume from the '
                    'newest checkpoint, if any\n')
