"""The notebooks are the source: the committed package must be what `nbdev_export` makes of them, the
notebooks must be clean, and the README must be what `.ci/readme.py` makes of nbs/index.ipynb.
(The notebooks themselves run under `nbdev_test`, the first half of the test command.)"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

root = Path(__file__).resolve().parent.parent


def test_every_notebook_is_numbered_and_readable():
    nbs = sorted(p.name for p in (root / 'nbs').glob('*.ipynb'))
    assert 'index.ipynb' in nbs and '00_utils.ipynb' in nbs
    for name in nbs:
        nb = nbformat.read(root / 'nbs' / name, as_version=4)
        assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# '), name


def test_package_matches_notebooks(tmp_path):
    dst = tmp_path / 'repo'
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns('.git', '*.egg-info', '__pycache__', 'docs', '_proc'))
    subprocess.run([Path(sys.executable).with_name('nbdev_export')], cwd=dst, check=True)
    for py in (root / 'myfla_gla').rglob('*.py'):
        rel = py.relative_to(root)
        assert (dst / rel).read_text() == py.read_text(), f'{rel} differs from nbdev_export: re-export and commit'
    made = {p.relative_to(dst) for p in (dst / 'myfla_gla').rglob('*.py')}
    have = {p.relative_to(root) for p in (root / 'myfla_gla').rglob('*.py')}
    assert made <= have, f'nbdev_export makes files that are not committed: {made - have}'


def test_readme_matches_index():
    spec = subprocess.run([sys.executable, root / '.ci' / 'readme.py', '--check'], capture_output=True, text=True)
    assert spec.returncode == 0, spec.stderr


def test_the_benchmarks_page_shows_the_stored_records():
    """The benchmarks page's outputs are stored (the docs build does not run notebooks): each record of
    nbs/bench_results must be the one they show, by its date. Re-run nbs/09_benchmarks.ipynb after changing a record."""
    page = (root / 'nbs' / '09_benchmarks.ipynb').read_text(encoding='utf-8')
    records = sorted((root / 'nbs' / 'bench_results').rglob('*.json'))
    assert records
    stale = [str(p.relative_to(root)) for p in records if json.loads(p.read_text())['meta']['date'] not in page]
    assert not stale, f'nbs/09_benchmarks.ipynb shows older versions of {stale}: re-run it'
