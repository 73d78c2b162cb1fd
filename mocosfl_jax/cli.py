"""What the commands (``main``, ``evaluate``, ``plot``) share on the command line.

Every mistake a user can fix ends the command with one ``error:`` line and
exit status 1: a flag or config file that does not parse, an unknown config
field (named with the closest valid ones), and an output directory or file
that cannot be written (checked before any work starts). Ctrl-C outside the
training rounds ends the process at once with one line and status 130.

This module imports nothing heavy, so that ``main`` can install the Ctrl-C
handler before it imports JAX.
"""
from __future__ import annotations

import difflib
import importlib.machinery
import os
import pathlib
import re
import signal
import sys
import tempfile
import traceback
import types
from typing import Any, Sequence

from absl import flags
from ml_collections import config_dict

# Suggestions must be this similar (difflib's ratio) to the unknown name.
_CLOSE = 0.75


class OutputPathError(ValueError):
  """A directory or file that the command cannot write; the message is one line."""


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------

def stop_at_once_on_interrupt(message: str) -> None:
  """Makes SIGINT (Ctrl-C) end the process at once: ``message`` on stderr, status 130.

  Python's default raises KeyboardInterrupt wherever the main thread happens
  to be: during an import it crashed the interpreter (a segmentation fault),
  inside a garbage-collection callback of JAX it was swallowed ("Exception
  ignored") and the run went on, and elsewhere it unwound into a traceback
  and a shutdown that crashed with XLA's threads still running. Ending the
  process in the handler is what SIGKILL does, which the checkpoints are
  built to survive. The training rounds take SIGINT over with
  ``checkpoint.StopOnSignal`` (stop after the round, with a checkpoint) and
  hand it back afterwards, which makes this handler their "second signal
  stops at once" as well.

  Where SIGINT is ignored (a background job of a non-interactive shell, or
  ``nohup``), it stays ignored. Call it from the main thread.
  """
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return
  # On a terminal the line may hold '^C' or a progress bar: start a new one.
  line = (('\n' if sys.stderr.isatty() else '') + message + '\n').encode()

  def exit_at_once(signum, frame):
    del frame
    # Lines still in Python's buffers would be lost by os._exit. A flush
    # that the signal interrupted mid-write cannot be re-entered: skip it.
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    try:
      os.write(2, line)
    except OSError:  # stderr closed: exit all the same
      pass
    os._exit(128 + signum)  # pylint: disable=protected-access

  signal.signal(signal.SIGINT, exit_at_once)


# ---------------------------------------------------------------------------
# Output paths
# ---------------------------------------------------------------------------

def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
  return next(p for p in (path, *path.parents) if p.exists())


def _probe_write(directory: pathlib.Path) -> str | None:
  """Why a file cannot be created in ``directory``, or None if it can.

  Creating one (unnamed, gone when closed) is the only test that holds for
  root too: os.access grants root everything, while a read-only filesystem
  still refuses it.
  """
  try:
    with tempfile.TemporaryFile(dir=directory):
      return None
  except OSError as e:
    return e.strerror or str(e)


def check_output_dir(path: str | os.PathLike, name: str) -> None:
  """Raises OutputPathError unless ``path`` is, or can be made, a writable directory.

  Creates nothing. ``name`` says which path it is in the message, e.g.
  ``'--workdir=runs/a'``.
  """
  path = pathlib.Path(path)
  try:
    if path.exists() and not path.is_dir():
      raise OutputPathError(f'{name} is a file, not a directory')
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
      raise OutputPathError(f'{name} lies under {existing}, which is a file')
    reason = _probe_write(existing)
  except OSError as e:  # stat refused, e.g. a folder on the way that we may not enter
    raise OutputPathError(f'{name}: {e.strerror or e}') from e
  if reason is not None:
    where = 'is not writable' if existing == path.absolute() else f'cannot be created in {existing}'
    raise OutputPathError(f'{name} {where} ({reason})')


def check_output_file(path: str | os.PathLike, name: str) -> None:
  """Raises OutputPathError unless a file ``path`` can be written in an existing folder.

  Creates nothing. ``name`` says which path it is in the message.
  """
  path = pathlib.Path(path)
  folder = path.absolute().parent
  try:
    if path.is_dir():
      raise OutputPathError(f'{name} is a directory')
    if not folder.is_dir():
      existing = _nearest_existing(folder)
      if existing.is_dir():
        raise OutputPathError(f'{name}: no directory {folder}')
      raise OutputPathError(f'{name} lies under {existing}, which is a file')
    reason = _probe_write(folder)
  except OSError as e:
    raise OutputPathError(f'{name}: {e.strerror or e}') from e
  if reason is not None:
    raise OutputPathError(f'{name} cannot be written: {folder} is not writable ({reason})')


# ---------------------------------------------------------------------------
# Flags and config files
# ---------------------------------------------------------------------------

def parse_flags(argv: Sequence[str], *, flag_values: flags.FlagValues = flags.FLAGS,
                config_flag: str | None = None) -> list[str]:
  """Parses ``argv`` into ``flag_values``; a mistake exits with one ``error:`` line.

  For ``absl.app.run``'s ``flags_parser`` (with functools.partial). The
  config file of ``--<config_flag>`` is loaded, and its overrides applied,
  while the flags are parsed, so its mistakes surface here as the exceptions
  of absl and ml_collections, many lines long or naming only part of a field;
  they are diagnosed again from ``argv`` to name the problem.

  Returns:
    The arguments that are not flags, program name first.
  """
  try:
    rest = flag_values(list(argv))
  except Exception as e:  # pylint: disable=broad-except  (absl, ml_collections, the config file)
    sys.exit(f'error: {_flag_problem(e, argv, flag_values, config_flag)}')
  if config_flag is not None and not isinstance(flag_values[config_flag].value,
                                                config_dict.ConfigDict):
    # ml_collections defers a missing file's error to the config's first use.
    sys.exit(f'error: {_flag_problem(None, argv, flag_values, config_flag)}')
  return rest


def _flag_problem(error: Exception | None, argv: Sequence[str], flag_values: flags.FlagValues,
                 config_flag: str | None) -> str:
  """One line saying what is wrong with ``argv``, whose parsing raised ``error``."""
  try:
    argv = flag_values.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error:  # a --flagfile that cannot be read: absl's message says so
    argv = list(argv)
  if config_flag is not None:
    spec = _flag_value(argv, config_flag)
    if spec is not None:
      config, problem = _load_config(spec, f'--{config_flag}')
      if problem is None and not isinstance(config, config_dict.ConfigDict):
        problem = f'--{config_flag}={spec}: get_config() returned {type(config).__name__}'
      if problem is None:
        problem = _override_problem(config, argv, config_flag, error)
      if problem is not None:
        return problem
  if error is None:
    return f'--{config_flag} could not be read'
  # absl's messages start 'flag --name=value: ...'.
  return _one_line(str(error)).removeprefix('flag ')


def _one_line(text: str) -> str:
  return ' '.join(text.split())


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value of ``--name=value`` or ``--name value`` in ``argv``."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    match = re.fullmatch(rf'--?{re.escape(name)}(=(.*))?', arg)
    if match and match.group(1):
      value = match.group(2)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config(spec: str, name: str = '--config') -> tuple[Any, str | None]:
  """(get_config()'s result, None), or (None, a one-line problem), for ``--config=spec``.

  ``spec`` is FILE or FILE:ARG as ml_collections takes it: ARG is passed to
  get_config.
  """
  path, *args = spec.split(':', 1)
  given = f'{name}={spec}'
  if os.path.isdir(path):
    return None, f'{given} is a directory, not a config file'
  if not os.path.isfile(path):
    # A relative path is relative to where the command runs.
    return None, f'{given}: no such file' + ('' if os.path.isabs(path) else
                                               f' in {os.getcwd()}')
  try:
    loader = importlib.machinery.SourceFileLoader('mocosfl_jax_config_check', path)
    module = types.ModuleType(loader.name)
    module.__file__ = path
    loader.exec_module(module)
  except SyntaxError as e:
    return None, f'{given} does not parse: {e.msg} (line {e.lineno})'
  except Exception as e:  # pylint: disable=broad-except  (whatever the file raises)
    return None, f'{given} fails: {_described(e, path)}'
  if not callable(getattr(module, 'get_config', None)):
    return None, f'{given} defines no get_config()'
  try:
    return module.get_config(*args), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f'{given}: get_config() fails: {_described(e, path)}'


def _described(error: Exception, path: str) -> str:
  """``Type: message (line N)``, N the innermost line of ``path`` in the traceback."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  where = f' (line {lines[-1]})' if lines else ''
  return f'{type(error).__name__}: {_one_line(str(error))}{where}'


def field_paths(config: config_dict.ConfigDict, prefix: str = '') -> list[str]:
  """Every field's dotted path, nested ConfigDicts and their fields included."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, config_dict.ConfigDict):
      paths.extend(field_paths(value, f'{prefix}{key}.'))
  return paths


def closest_fields(path: str, paths: Sequence[str]) -> list[str]:
  """The valid paths that ``path`` probably meant: near as a whole or by last name."""
  by_name: dict[str, list[str]] = {}
  for p in paths:
    by_name.setdefault(p.rsplit('.', 1)[-1], []).append(p)
  named = difflib.get_close_matches(path.rsplit('.', 1)[-1], by_name, n=3, cutoff=_CLOSE)
  close = [p for name in named for p in by_name[name]]
  close += difflib.get_close_matches(path, paths, n=3, cutoff=_CLOSE)
  return list(dict.fromkeys(close))[:3]


def _unknown_field_message(path: str, config: config_dict.ConfigDict, flag: str) -> str:
  """Names the unknown ``path`` and the valid fields it was probably meant to be."""
  paths = field_paths(config)
  close = closest_fields(path, paths)
  if close:
    hint = 'did you mean ' + ' or '.join(close) + '?'
  else:
    # Nothing near: the fields where the path stopped matching.
    parent = path.rsplit('.', 1)[0] if '.' in path else ''
    while parent and parent not in paths:
      parent = parent.rsplit('.', 1)[0] if '.' in parent else ''
    prefix = f'{parent}.' if parent else ''
    names = [p for p in paths if p.startswith(prefix) and '.' not in p[len(prefix):]]
    hint = f'the fields{" of " + parent if parent else ""} are ' + ', '.join(names)
  return f'unknown config field {path} (--{flag}.{path}): {hint}'


def _override_problem(config: config_dict.ConfigDict, argv: Sequence[str], flag: str,
                      error: Exception | None) -> str | None:
  """An unknown field among ``argv``'s ``--flag.field`` overrides, or a value that
  does not parse as its field's type; None if neither."""
  paths = set(field_paths(config))
  for arg in argv[1:]:
    match = re.match(rf'--?(no)?{re.escape(flag)}\.([^=]+)(=.*)?$', arg)
    if match and match.group(2) not in paths:
      return _unknown_field_message(match.group(2), config, flag)
  if isinstance(error, flags.IllegalFlagValueError):
    match = re.match(rf'flag --{re.escape(flag)}\.([^=]+)=(.*?): (.*)', str(error), re.DOTALL)
    if match:
      field, value, reason = match.groups()
      current = _value_at(config, field)
      if current is None:  # no type to name: absl's reason says what it tried
        return f'--{flag}.{field}={value}: {_one_line(reason)}'
      kind = type(current).__name__
      article = 'an' if kind[0] in 'aeiou' else 'a'
      return f'--{flag}.{field}={value}: {field} takes {article} {kind}, not {value!r}'
  return None


def _value_at(config: config_dict.ConfigDict, path: str) -> Any:
  value = config
  for key in path.split('.'):
    value = value[key]
  return value
