"""Tests for mocosfl_jax.plot: PNG output, panels per run, CLI errors."""
import os
import subprocess
import sys

from matplotlib.figure import Figure
import pytest

from mocosfl_jax import metrics
from mocosfl_jax import plot

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_run(workdir, rounds=6, knn_every=2):
  with metrics.MetricsWriter(workdir, tensorboard=False) as writer:
    for r in range(1, rounds + 1):
      record = {'round': r, 'step': 10 * r, 'loss': 9.0 / r,
                'contrastive_accuracy': 0.1 * r}
      if knn_every and r % knn_every == 0:
        record['knn_accuracy'] = 40.0 + r
      writer.write(record)
  return str(workdir)


def _assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == _PNG_SIGNATURE
  assert os.path.getsize(path) > 1000


@pytest.fixture
def saved_figures(monkeypatch):
  """Figures passed to savefig, to inspect what was drawn."""
  figures = []
  original = Figure.savefig

  def recording_savefig(self, *args, **kwargs):
    figures.append(self)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Figure, 'savefig', recording_savefig)
  return figures


def _lines_by_panel(figure):
  """{panel title: {line label: (xdata, ydata)}}."""
  return {ax.get_title(): {line.get_label(): (list(line.get_xdata()),
                                              list(line.get_ydata()))
                           for line in ax.lines}
          for ax in figure.axes}


def test_one_run_defaults_to_workdir_png(tmp_path, saved_figures):
  workdir = _make_run(tmp_path / 'run_a')
  assert plot.main([workdir]) == 0
  _assert_png(os.path.join(workdir, 'metrics.png'))
  panels = _lines_by_panel(saved_figures[-1])
  assert panels['Training loss']['run_a'][0] == [10, 20, 30, 40, 50, 60]
  assert panels['kNN accuracy']['run_a'] == ([20, 40, 60], [42.0, 44.0, 46.0])
  assert panels['Contrastive accuracy'].keys() == {'run_a'}


def test_several_runs_share_panels_in_comparison_png(tmp_path, monkeypatch,
                                                     saved_figures):
  run_a = _make_run(tmp_path / 'run_a')
  run_b = _make_run(tmp_path / 'run_b', rounds=4)
  monkeypatch.chdir(tmp_path)
  assert plot.main([run_a, run_b]) == 0
  _assert_png(tmp_path / 'comparison.png')
  figure = saved_figures[-1]
  for lines in _lines_by_panel(figure).values():
    assert lines.keys() == {'run_a', 'run_b'}
  (legend,) = figure.legends
  assert [t.get_text() for t in legend.get_texts()] == ['run_a', 'run_b']


def test_plot_runs_writes_requested_file(tmp_path):
  out = str(tmp_path / 'out.png')
  runs = [_make_run(tmp_path / 'a'), _make_run(tmp_path / 'b')]
  assert plot.plot_runs(runs, out) == out
  _assert_png(out)


def test_x_round_plots_against_rounds(tmp_path, saved_figures):
  workdir = _make_run(tmp_path / 'run_a')
  plot.plot_runs([workdir], str(tmp_path / 'out.png'), x='round')
  panels = _lines_by_panel(saved_figures[-1])
  assert panels['Training loss']['run_a'][0] == [1, 2, 3, 4, 5, 6]
  assert saved_figures[-1].axes[0].get_xlabel() == 'round'


def test_run_without_knn_still_plots_loss(tmp_path, saved_figures):
  with_knn = _make_run(tmp_path / 'with_knn')
  without_knn = _make_run(tmp_path / 'without_knn', knn_every=0)
  plot.plot_runs([with_knn, without_knn], str(tmp_path / 'out.png'))
  panels = _lines_by_panel(saved_figures[-1])
  assert panels['Training loss'].keys() == {'with_knn', 'without_knn'}
  assert panels['kNN accuracy'].keys() == {'with_knn'}


def test_runs_with_same_name_get_distinct_labels(tmp_path, saved_figures):
  run_a = _make_run(tmp_path / 'a' / 'seed0')
  run_b = _make_run(tmp_path / 'b' / 'seed0')
  plot.plot_runs([run_a, run_b], str(tmp_path / 'out.png'))
  labels = _lines_by_panel(saved_figures[-1])['Training loss'].keys()
  assert len(labels) == 2


def test_missing_directory_is_one_line_error(tmp_path):
  missing = str(tmp_path / 'not_a_run')
  result = subprocess.run(
      [sys.executable, '-m', 'mocosfl_jax.plot', missing],
      capture_output=True, text=True, cwd=_REPO_ROOT, check=False)
  # Status 1, as every other command's errors.
  assert result.returncode == 1
  assert result.stderr == f'error: no metrics file: {missing}/metrics.jsonl\n'


def test_empty_metrics_file_is_an_error(tmp_path, capsys):
  workdir = _make_run(tmp_path / 'fresh', rounds=0)
  assert plot.main([workdir]) == 1
  assert capsys.readouterr().err == f'error: no metrics records in {workdir}\n'


def test_an_output_that_cannot_be_written_is_an_error(tmp_path, capsys):
  workdir = _make_run(tmp_path / 'run')
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  assert plot.main([workdir, '--out', str(a_file / 'x.png')]) == 1
  assert capsys.readouterr().err == (
      f'error: --out={a_file}/x.png lies under {a_file}, which is a file\n')
  assert plot.main([workdir, '--out', str(tmp_path / 'no' / 'x.png')]) == 1
  assert capsys.readouterr().err == (
      f'error: --out={tmp_path}/no/x.png: no directory {tmp_path}/no\n')


def test_usage_mistakes_are_one_line_and_status_1(capsys):
  with pytest.raises(SystemExit) as exited:
    plot.main(['--x', 'time', 'run'])
  assert exited.value.code == 1
  assert capsys.readouterr().err == (
      "error: argument --x: invalid choice: 'time' (choose from 'step', 'round') "
      '(--help shows the usage)\n')
