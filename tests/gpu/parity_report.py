"""GPU parity report: every equivalence check against FLA, one pass/fail table with the worst errors.

Run on a CUDA machine with FLA 0.6.0 importable, from the repository root:

    python tests/gpu/parity_report.py --out tests/gpu/parity_report.txt

It runs, in this one process:
1. the FLA-parity test suites `tests/gpu/test_*_fla.py` (pytest; extra arguments after `--` go to pytest),
2. the self-check's CUDA rows (`python -m myfla_gla --device cuda`: ops, modules and layer against float64,
   and FLA's chunk_gla / fused_recurrent_gla / layer with its state_dict loaded into ours),
3. with `--notebooks [GLOB]` (needs nbdev), every notebook (or those matching nbs/GLOB.ipynb), whose closing
   equivalence sections compare against FLA on CUDA.

Every call of `assert_close` (myfla_gla's, or FLA's `fla.utils.assert_close`) is recorded, so each test's row
shows how many comparisons it made and the worst one: its relative RMS error, its bound, and their ratio (the
margin: below 1 passes). Tests that compare otherwise show their outcome only. Exit status 1 if anything failed.
Without CUDA or FLA everything is reported as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import sys
import time
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(root))

sys.path.insert(0, str(root / 'tests' / 'gpu'))

import fla_quick  # noqa: E402
import torch  # noqa: E402

import myfla_gla  # noqa: E402
import myfla_gla.utils  # noqa: E402
from myfla_gla.utils import fla_available, get_err_ratio  # noqa: E402


class Recorder:
    "Patches every `assert_close` in reach to record (what, error, bound, passed) under the current test's name."

    def __init__(self):
        self.current = None
        self.records = defaultdict(list)
        self.outcomes = {}  # test name -> (outcome, message)
        self.seconds = defaultdict(float)
        self.order = []

    def _wrap(self, orig):
        rec = self

        def assert_close(prefix, ref, x, ratio, *args, **kwargs):
            ok = False
            try:
                out = orig(prefix, ref, x, ratio, *args, **kwargs)
                ok = True
                return out
            finally:
                if rec.current is not None:  # None: a caller that makes its own rows (the self-check)
                    try:
                        err = get_err_ratio(ref, x)
                    except Exception:
                        err = math.inf
                    rec.records[rec.current].append((str(prefix), err, float(ratio), ok))
        assert_close.__wrapped__ = orig
        return assert_close

    def install(self):
        "Replace `assert_close` in myfla_gla (every loaded module) and in fla.utils, before tests import it."
        originals = {myfla_gla.utils.assert_close}
        try:
            import fla.utils
            originals.add(fla.utils.assert_close)
        except Exception:
            pass
        wrapped = {f: self._wrap(f) for f in originals}
        for name, mod in list(sys.modules.items()):
            if mod is not None and (name == 'myfla_gla' or name.startswith('myfla_gla.') or name == 'fla.utils'):
                f = getattr(mod, 'assert_close', None)
                if f in wrapped:
                    setattr(mod, 'assert_close', wrapped[f])

    def start(self, name):
        self.current = name
        if name not in self.order:
            self.order.append(name)

    def finish(self, name, outcome, message=''):
        old = self.outcomes.get(name, ('passed', ''))
        if outcome != 'passed' or old[0] == 'passed':  # a failure or skip in any phase wins
            self.outcomes[name] = (outcome, message)

    deadline = math.inf  # time.perf_counter() after which the remaining tests are skipped (--deadline)

    # pytest hooks (this object is passed to pytest.main as a plugin)
    def pytest_runtest_setup(self, item):
        import pytest
        if time.perf_counter() > self.deadline:
            pytest.skip('not run: the --deadline had passed')

    def pytest_runtest_logstart(self, nodeid, location):
        self.start(nodeid)

    def pytest_collectreport(self, report):
        "A test file skipped or broken as a whole (no CUDA, FLA missing, an import error) makes one row."
        if report.outcome != 'passed' and report.nodeid:
            self.start(report.nodeid)
            if report.skipped and isinstance(report.longrepr, tuple):
                msg = str(report.longrepr[2]).replace('Skipped: ', '')
            else:
                crash = getattr(report.longrepr, 'reprcrash', None)
                msg = getattr(crash, 'message', '') or (str(report.longrepr).strip().splitlines() or [''])[-1]
            self.finish(report.nodeid, 'failed' if report.failed else 'skipped', msg.splitlines()[0] if msg else '')

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] += report.duration
        if report.when == 'call' or report.outcome != 'passed':
            msg = ''
            if report.skipped and isinstance(report.longrepr, tuple):
                msg = str(report.longrepr[2]).replace('Skipped: ', '')
            elif report.failed:
                crash = getattr(report.longrepr, 'reprcrash', None)
                msg = getattr(crash, 'message', '') or str(report.longrepr).strip().splitlines()[-1]
                msg = msg.splitlines()[0] if msg else ''
            self.finish(report.nodeid, report.outcome, msg)


class Tee(io.StringIO):
    "Keeps pytest's output for the report and shows it as it comes, so a run cut off by a time limit still says where."

    def write(self, s):
        sys.__stdout__.write(s)
        sys.__stdout__.flush()
        return super().write(s)


def run_pytest(rec: Recorder, extra: list[str], suites: list[str] | None = None) -> str:
    import pytest
    files = sorted((root / 'tests' / 'gpu').glob('test_*_fla.py'))
    if suites:
        files = [f for f in files if f.stem.removeprefix('test_').removesuffix('_fla') in suites]
    if not files:
        rec.start('tests/gpu/test_*_fla.py')
        rec.finish('tests/gpu/test_*_fla.py', 'skipped', 'no FLA-parity test files found')
        return ''
    buf = Tee()
    with redirect_stdout(buf):
        pytest.main(['-v', '-p', 'no:cacheprovider', '--rootdir', str(root), '-o', 'console_output_style=classic', '--tb=short',
                     *map(str, files), *extra], plugins=[rec])
    return buf.getvalue()


def run_selfcheck(rec: Recorder):
    from myfla_gla.__main__ import selfcheck
    if not torch.cuda.is_available():
        rec.start('self-check (cuda)')
        rec.finish('self-check (cuda)', 'skipped', 'no CUDA device')
        return
    t = time.perf_counter()
    rec.current = None
    rows = selfcheck(devices=['cuda'], fla=True)
    secs = (time.perf_counter() - t) / max(len(rows), 1)
    for r in rows:
        name = f'self-check {r.device} {r.check} {r.dtype}'.rstrip()
        rec.start(name)
        if r.err is not None and r.bound is not None:
            rec.records[name].append((r.worst, r.err, r.bound, r.status == 'PASS'))
        outcome = {'PASS': 'passed', 'FAIL': 'failed'}.get(r.status, 'skipped')
        rec.finish(name, outcome, r.note if r.status != 'PASS' or 'FLA' in r.check else '')
        rec.seconds[name] = (r.ms or 0) / 1e3 or secs


def run_notebooks(rec: Recorder, pattern: str = '*'):
    try:
        from nbdev.test import test_nb
    except ImportError:
        rec.start('notebooks')
        rec.finish('notebooks', 'skipped', 'nbdev not installed (pip install the dev requirements)')
        return
    for nb in sorted((root / 'nbs').glob(f'{pattern}.ipynb')):
        name = f'notebook {nb.name}'
        rec.start(name)
        t = time.perf_counter()
        ok, _ = test_nb(nb, skip_flags=['notest'], force_flags=['cuda'], showerr=True, basepath=root)
        rec.seconds[name] = time.perf_counter() - t
        rec.finish(name, 'passed' if ok else 'failed', '' if ok else 'a cell raised (traceback on stderr)')


def header() -> str:
    lines = [f'myfla_gla GPU parity report, {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
             f'torch {torch.__version__}, python {platform.python_version()}, myfla_gla {myfla_gla.__version__}']
    if torch.cuda.is_available():
        lines.append(f'device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})')
    else:
        lines.append('device: no CUDA device: the FLA comparisons are skipped')
    try:
        import fla
        import triton
        lines.append(f'FLA {getattr(fla, "__version__", "?")}, triton {triton.__version__}, '
                     f'fla_available()={fla_available()}')
    except Exception as e:
        lines.append(f'FLA not importable ({type(e).__name__}: {e})')
    if os.environ.get('MYFLA_FLA_FIRST_CONFIG') == '1':
        lines.append("FLA's kernels ran with the first configuration that runs, untuned (MYFLA_FLA_FIRST_CONFIG=1)")
    return '\n'.join(lines)


def table(rec: Recorder) -> tuple[str, dict]:
    "The pass/fail table, worst comparison per test; and the counts."
    head = ('result', 'checks', 'worst error', 'bound', 'margin', 'worst of', 's', 'test')
    rows, counts = [], defaultdict(int)
    for name in rec.order:
        outcome, msg = rec.outcomes.get(name, ('passed', ''))
        counts[outcome] += 1
        recs = rec.records.get(name, [])
        cells = [outcome.upper(), str(len(recs)) if recs else '-', '-', '-', '-', '-']
        if recs:
            what, err, bound, _ = max(recs, key=lambda r: (r[1] / r[2]) if r[2] else math.inf)
            cells[2:] = [f'{err:.2e}', f'{bound:.0e}', f'{err / bound:.2f}' if bound else '-', what[:28]]
        line = cells + [f'{rec.seconds.get(name, 0):.1f}', name.replace('tests/gpu/', '')]
        if msg and outcome != 'passed':
            line[-1] += f'  [{msg[:160]}]'
        elif msg:
            line[-1] += f'  ({msg[:120]})'
        rows.append(line)
    w = [max(len(x) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = lambda cells: '  '.join(c.ljust(n) for c, n in zip(cells, w[:-1])) + '  ' + cells[-1]
    out = [fmt(head), fmt(['-' * n for n in w[:-1]] + ['-' * 4])] + [fmt(r) for r in rows]
    worst = [(r[1] / r[2], n, r) for n, rs in rec.records.items() for r in rs if r[2]]
    summary = (f"{len(rows)} rows: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
               f"{sum(map(len, rec.records.values()))} comparisons recorded")
    if worst:
        m, n, r = max(worst)
        summary += f'; largest margin {m:.2f} ({r[0]} in {n.replace("tests/gpu/", "")})'
    return '\n'.join(out + ['', summary]), counts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = ' '.join(['python tests/gpu/parity_report.py', *argv])
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', help='also write the report to this file (e.g. tests/gpu/parity_report.txt)')
    p.add_argument('--suite', action='append', metavar='NAME',
                   help='run only tests/gpu/test_NAME_fla.py (repeatable: modules, recurrent, chunk, layer, models)')
    p.add_argument('--deadline', type=float, metavar='S',
                   help='skip the tests not yet started after S seconds, so that a time-limited run still reports')
    p.add_argument('--no-pytest', action='store_true', help='skip the tests/gpu suites')
    p.add_argument('--no-selfcheck', action='store_true', help="skip the self-check's CUDA rows")
    p.add_argument('--notebooks', nargs='?', const='*', metavar='GLOB',
                   help='also run the notebooks nbs/GLOB.ipynb (default: every one; needs nbdev)')
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rec = Recorder()
    rec.install()
    if a.deadline:
        rec.deadline = t0 + a.deadline
    if fla_quick.install():
        print('MYFLA_FLA_FIRST_CONFIG=1: FLA takes the first kernel configuration that runs (no autotuning)')
    log = ''
    if not a.no_pytest:
        log = run_pytest(rec, extra, a.suite)
    if not a.no_selfcheck:
        run_selfcheck(rec)
    if a.notebooks:
        run_notebooks(rec, a.notebooks)
    text, counts = table(rec)
    report = f'{header()}\ncommand: {cmd} ({time.perf_counter() - t0:.0f} s)\n\n{text}\n'
    if counts['failed'] and log:
        report += '\npytest output (failures):\n' + log[-6000:]
    print(report)
    if a.out:
        Path(a.out).write_text(report)
    return 1 if counts['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
