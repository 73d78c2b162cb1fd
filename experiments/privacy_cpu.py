"""The privacy settings at CPU size (issue 16, section 6): attack, ResSFL, TAResSFL.

    python -m experiments.privacy_cpu --out=experiments/results/privacy_cpu.json \
        [--data=../shared/data/cifar10] [--workdir_root=runs/privacy_cpu] [--steps=400] \
        [--stage2_steps=N] [--expert_rounds=4] [--rows=plain,ressfl,...] [--reuse=plain,...]

Runs, one after another, each as its own ``python -m mocosfl_jax.main``
process (so that no run's memory or compiled programs stay behind), on
CIFAR-10 from the npz copy at ``--data``, ResNet-18 at width 1/8, cut 1:

1. ``plain``: configs/cifar10_cpu.py (10 clients, 2 classes each, batch 10)
   for ``--steps`` steps, then the model-inversion attack on its final client;
2. ``ressfl``: the same with the ResSFL regulariser (alpha 2, target SSIM
   0.6, the default 'custom' simulated attacker), attacked the same way;
3. ``ressfl_strong``: the same with a larger alpha and a lower target; by
   default only when ``ressfl``'s attack SSIM is not below ``plain``'s,
   always when ``--rows`` names it;
4. ``expert``: TAResSFL stage 1 (configs/taressfl_expert.py) at CPU size:
   1% of CIFAR-10 as the target, scikit-learn's digits standing in for
   CIFAR-100, batch 64, ``--expert_rounds`` rounds;
5. ``stage2``: TAResSFL stage 2 (configs/taressfl_cifar10.py) at CPU size:
   10 clients, batch 10, no auto_adjust, ``--stage2_steps`` steps (default
   ``--steps``), server rate 0.03
   (the reference's 0.001 is for 100,000 steps), frozen clients loaded from
   the expert's best-kNN model, attacked like the others. Then checks that every
   client's online (and EMA) model in its final checkpoint is bit-identical
   to the expert's client that it loaded, and that kNN rose.

Rows 1-3 take kNN at the start, half way (or every ``--knn_every`` rounds)
and at the end; 4 and 5 at the start and the end only (each is a pass over
60,000 images). The attack runs in this process after each run's training
(``mocosfl_jax.attack.run`` on its final checkpoint, attack.json and .png in
its workdir), with the same settings for every row (``--attack_epochs``,
``--attack_channels``; 20 x 16 channels by default: on a shared 2-core CPU
it took 27 minutes), recorded in the JSON; ``--reuse`` keeps a row's
finished run and only attacks it. Each row records the setting,
kNN (initial, final, best), the attack's MSE, SSIM and PSNR, the
communication per client, the wall time, the exact command and the load
average at its start (the machine may be shared). The JSON is rewritten
after every row, so an interrupted script keeps what it measured; rows
already in ``--out`` that this invocation does not run stay (so the rows may
run in several invocations, and must then share the attack's settings).
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

from absl import app, flags

from experiments import results_file

_OUT = flags.DEFINE_string('out', None, 'JSON file to write.')
_DATA = flags.DEFINE_string('data', '../shared/data/cifar10',
                            'Folder of CIFAR-10 train.npz and test.npz.')
_ROOT = flags.DEFINE_string('workdir_root', 'runs/privacy_cpu', 'Parent of the runs\' workdirs.')
_STEPS = flags.DEFINE_integer('steps', 400, 'Steps of the 10-client runs (100 a round).',
                              lower_bound=100)
_STAGE2_STEPS = flags.DEFINE_integer('stage2_steps', None, 'Steps of TAResSFL stage 2 '
                                     '(default: --steps).', lower_bound=100)
_EXPERT_ROUNDS = flags.DEFINE_integer('expert_rounds', 4, 'Rounds (epochs) of the expert.',
                                      lower_bound=1)
_ATTACK_EPOCHS = flags.DEFINE_integer('attack_epochs', 20, 'The attack decoder\'s epochs.',
                                      lower_bound=1)
_ATTACK_CHANNELS = flags.DEFINE_integer('attack_channels', 16, 'The attack decoder\'s width.',
                                        lower_bound=1)
_KNN_EVERY = flags.DEFINE_integer('knn_every', 0, 'Rounds between kNN evaluations of rows 1-3 '
                                  '(0: half way; each costs a pass over 60,000 images).',
                                  lower_bound=0)
_ROWS = flags.DEFINE_list('rows', None, 'Only these rows (default: all, in order).')
_REUSE = flags.DEFINE_list('reuse', [], 'Rows whose finished workdir (summary.json) is kept: '
                           'not trained again, only attacked.')

STEPS_PER_ROUND = 100
RESSFL = {'ressfl_alpha': 2.0, 'target_ssim': 0.6}
RESSFL_STRONG = {'ressfl_alpha': 10.0, 'target_ssim': 0.3}


def overrides(**fields) -> list[str]:
  return [f'--config.{name.replace("__", ".")}={value}' for name, value in fields.items()]


def attack_overrides() -> dict:
  return {'attack_epochs': _ATTACK_EPOCHS.value, 'attack_channels': _ATTACK_CHANNELS.value}


def ten_clients(rounds: int, every: int) -> dict:
  """configs/cifar10_cpu.py's layout at ``rounds`` rounds, kNN and checkpoints ``every`` rounds."""
  return {'data__source': 'npz', 'data__path': _DATA.value, 'num_clients': 10,
          'noniid_ratio': 0.2, 'batch_size': 10, 'cut_layer': 1,
          'steps_per_round': STEPS_PER_ROUND, 'num_rounds': rounds, 'sync_every': 50,
          'model__width': 0.125, 'moco__queue_size': 4096, 'eval__every': every,
          'checkpoint__every': every}


def ressfl_fields(settings: dict) -> dict:
  return {f'privacy__{name}': value for name, value in settings.items()}


def rows(root: pathlib.Path) -> dict[str, dict]:
  """Every row's setting, config and overrides, in running order."""
  rounds = _STEPS.value // STEPS_PER_ROUND
  plain = {**ten_clients(rounds, _KNN_EVERY.value or max(1, rounds // 2)), 'optim__lr': 0.03}
  # Stage 1 and 2 take kNN at the start and the end only: each costs a pass over 60,000 images.
  stage2_rounds = (_STAGE2_STEPS.value or _STEPS.value) // STEPS_PER_ROUND
  return {
      'plain': {'setting': 'MocoSFL, cut 1', 'config': 'configs/cifar10_cpu.py',
                'fields': plain},
      'ressfl': {'setting': 'MocoSFL + ResSFL (alpha 2, target SSIM 0.6), cut 1',
                 'config': 'configs/cifar10_cpu.py', 'fields': {**plain, **ressfl_fields(RESSFL)}},
      'ressfl_strong': {'setting': 'MocoSFL + ResSFL (alpha 10, target SSIM 0.3), cut 1',
                        'config': 'configs/cifar10_cpu.py',
                        'fields': {**plain, **ressfl_fields(RESSFL_STRONG)}},
      'expert': {'setting': 'TAResSFL stage 1: expert (1% CIFAR-10 + digits), C4S2, cut 1',
                 'config': 'configs/taressfl_expert.py',
                 'fields': {'data__source': 'npz', 'data__path': _DATA.value,
                            'data__aux_source': 'digits', 'data__aux_name': 'digits',
                            'model__width': 0.125, 'batch_size': 64,
                            'num_rounds': _EXPERT_ROUNDS.value,
                            'eval__every': _EXPERT_ROUNDS.value,
                            'checkpoint__every': _EXPERT_ROUNDS.value,
                            'eval__final_probes': False}},
      'stage2': {'setting': 'TAResSFL stage 2: frozen expert clients, C4S2, cut 1',
                 'config': 'configs/taressfl_cifar10.py',
                 'fields': {**ten_clients(stage2_rounds, stage2_rounds), 'auto_adjust': False,
                            'optim__lr': 0.03,
                            'init__from_workdir': str(root / 'expert'),
                            # This script attacks every row alike itself.
                            'privacy__attack_at_end': False,
                            'eval__final_probes': False}},
  }


def command(name: str, row: dict, root: pathlib.Path) -> list[str]:
  return [sys.executable, '-m', 'mocosfl_jax.main', f'--config={row["config"]}',
          f'--workdir={root / name}', '--fresh', *overrides(**row['fields'])]


def metrics_records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def without_summary(workdir: pathlib.Path) -> dict:
  """What a finished run whose summary.json was never written (stopped while it attacked
  at the end) can still say: kNN and time from metrics.jsonl; no communication."""
  records = metrics_records(workdir)
  knn = [r['knn_accuracy'] for r in records if 'knn_accuracy' in r]
  return {'initial_knn_accuracy': knn[0], 'final_knn_accuracy': knn[-1],
          'best_knn_accuracy': max(knn[1:] or knn), 'steps': records[-1]['step'],
          'rounds': records[-1]['round'], 'wall_seconds': records[-1]['elapsed_s'],
          'note': 'no summary.json (stopped during its attack at the end): kNN and time '
                  'from metrics.jsonl; communication not recorded'}


def row_result(name: str, row: dict, cmd: list[str], workdir: pathlib.Path, load: tuple,
               seconds: float) -> dict:
  """The row's numbers from summary.json (and attack.json within it)."""
  if not (workdir / 'summary.json').exists():
    return {'row': name, 'setting': row['setting'],
            'command': ' '.join(shlex.quote(part) for part in ['python'] + cmd[1:]),
            'script_command': ' '.join(sys.argv), **without_summary(workdir)}
  summary = json.loads((workdir / 'summary.json').read_text())
  comm = summary['run']['communication_per_client_mb']
  result = {
      'row': name, 'setting': row['setting'],
      'command': ' '.join(shlex.quote(part) for part in ['python'] + cmd[1:]),
      'script_command': ' '.join(sys.argv),
      'load_average_at_start': list(load), 'wall_seconds': seconds,
      'steps': summary['steps'], 'rounds': summary['rounds'],
      'initial_knn_accuracy': summary['initial_knn_accuracy'],
      'final_knn_accuracy': summary['final_knn_accuracy'],
      'best_knn_accuracy': summary['best_knn_accuracy'],
      'smashed_shape': summary['run']['smashed_shape'],
      'communication_per_client_mb': {k: comm[k] for k in ('upload_mb', 'download_mb',
                                                           'total_mb')},
  }
  simulated = last_attacker_ssim(workdir)
  if simulated is not None:
    result['last_simulated_attacker_ssim'] = simulated
  if 'attack' in summary:  # an attack at the end of training, with the run's own settings
    result['attack_at_end'] = attack_numbers(summary['attack'])
  return result


def attack_numbers(attack: dict) -> dict:
  keys = ('mse', 'ssim', 'ssim_valid', 'psnr')
  return {**{k: attack['metrics'].get(k) for k in keys},
          'epochs': attack['settings']['epochs'], 'channels': attack['settings']['channels']}


def run_attack(workdir: pathlib.Path) -> dict:
  """The attack on the final client, with this script's settings (attack.json, attack.png)."""
  from mocosfl_jax import attack  # pylint: disable=import-outside-toplevel

  load, tick = os.getloadavg(), time.perf_counter()
  result = attack.run(workdir, 'latest', attack_overrides())
  print(attack.describe(result), flush=True)
  return {**attack_numbers(result), 'checkpoint_round': result['checkpoint']['round'],
          'wall_seconds': time.perf_counter() - tick, 'load_average_at_start': list(load)}


def last_attacker_ssim(workdir: pathlib.Path) -> float | None:
  """ResSFL's simulated attackers' SSIM at the last logged step (metrics.jsonl), or None."""
  last = None
  for record in metrics_records(workdir):
    last = record.get('attacker_ssim', last)
  return last


def frozen_check(stage2: pathlib.Path, expert: pathlib.Path) -> dict:
  """Whether every client of stage 2's final checkpoint is the expert's client it loaded, bit for bit."""
  # Imported here: the rows' processes should not wait for this one's JAX.
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from mocosfl_jax import checkpoint, evaluate  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.export import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = workdir_lib.load(stage2, 'latest').config
  loaded = workdir_lib.load(expert, config.init.checkpoint)
  round_ = evaluate.selected_round(stage2, 'latest')
  path = (stage2 / checkpoint.CHECKPOINT_DIR / str(round_)).absolute()
  state = evaluate.read_checkpoint(
      path, state=ocp.args.StandardRestore(workdir_lib.abstract_state(config))).state
  clients = state.clients

  def identical(models) -> bool:
    if jax.tree.structure(loaded.online) != jax.tree.structure(models):
      return False
    pairs = zip(jax.tree.leaves(loaded.online), jax.tree.leaves(models))
    return all(np.array_equal(np.asarray(many), np.broadcast_to(one, np.shape(many)))
               for one, many in pairs)

  return {'expert_round_loaded': loaded.source['round'], 'stage2_round': round_,
          'num_clients': int(np.shape(jax.tree.leaves(clients.online)[0])[0]),
          'client_steps': [int(s) for s in np.asarray(clients.steps)],
          'online_identical': identical(clients.online), 'ema_identical': identical(clients.ema)}


def main(argv) -> None:
  del argv
  out, root = _OUT.value, pathlib.Path(_ROOT.value)
  all_rows = rows(root)
  wanted = _ROWS.value or list(all_rows)
  unknown = [name for name in wanted if name not in all_rows]
  if unknown:
    sys.exit(f'error: --rows: no row {", ".join(unknown)}; the rows are {", ".join(all_rows)}')
  results = earlier_results(out, wanted)
  done = {run['row']: run for run in results['runs'] if 'failed' not in run}
  for name in wanted:
    row = all_rows[name]
    if name == 'ressfl_strong' and _ROWS.value is None and not needs_stronger(done):
      print('ressfl_strong: skipped, ressfl\'s attack SSIM is already below plain\'s', flush=True)
      continue
    cmd = command(name, row, root)
    load, tick = os.getloadavg(), time.perf_counter()
    if name in _REUSE.value and (root / name / 'metrics.jsonl').exists():
      print(f'{name}: kept its finished run in {root / name}', flush=True)
      returncode, seconds = 0, None
    else:
      print('running:', ' '.join(cmd), flush=True)
      returncode = subprocess.run(cmd, check=False).returncode
      seconds = time.perf_counter() - tick
    if returncode:
      results_file.add_run(results, {'row': name, 'setting': row['setting'],
                                     'command': ' '.join(cmd), 'failed': returncode,
                                     'load_average_at_start': list(load),
                                     'wall_seconds': seconds}, out)
      continue
    result = row_result(name, row, cmd, root / name, load, seconds)
    if seconds is None:
      if result['wall_seconds'] is None:
        result['wall_seconds'] = json.loads(
            (root / name / 'summary.json').read_text())['wall_seconds']
      result['reused'] = True
    result['attack'] = run_attack(root / name)
    if name == 'stage2':
      result['frozen_check'] = frozen_check(root / name, root / 'expert')
      result['knn_rose'] = result['final_knn_accuracy'] > result['initial_knn_accuracy']
    done[name] = result
    results_file.add_run(results, result, out)


def earlier_results(out: str, wanted: list[str]) -> dict:
  """``out``'s results less the rows that run now (rows may run in several invocations)."""
  attack = {'epochs': _ATTACK_EPOCHS.value, 'channels': _ATTACK_CHANNELS.value}
  results = results_file.new(attack=attack)
  if os.path.exists(out):
    with open(out) as f:
      earlier = json.load(f)
    if earlier.get('attack') != attack:
      sys.exit(f'error: {out} holds attacks of other settings ({earlier.get("attack")}): '
               'every row must be attacked alike; use another --out')
    results['runs'] = [run for run in earlier['runs'] if run['row'] not in wanted]
  return results


def needs_stronger(done: dict) -> bool:
  """ResSFL at the paper's settings did not push the attack's SSIM below plain MocoSFL's."""
  if 'plain' not in done or 'ressfl' not in done:
    return True
  return done['ressfl']['attack']['ssim'] >= done['plain']['attack']['ssim']


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  app.run(main)
