"""Smoke tests of the self-check (`python -m myfla_gla`), the benchmark CLI (`python -m myfla_gla.bench`) and the
GPU parity report, at tiny sizes: argument parsing, the JSON record's shape, and that a wrong op makes the
self-check fail with a non-zero exit status."""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import myfla_gla
from myfla_gla import bench
from myfla_gla.__main__ import main as selfcheck_main, selfcheck

root = Path(__file__).resolve().parent.parent
env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get('PYTHONPATH', ''))


def wrong_naive(q, k, v, gk, initial_state=None, output_final_state=False):
    "The recurrence with its output 0.3% off."
    o, h = myfla_gla.ops.recurrent.naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)
    return o * 1.003, h


# ---------------------------------------------------------------- self-check

def test_selfcheck_passes_at_tiny_size(capsys):
    assert selfcheck_main(['--device', 'cpu', '--dtype', 'float32', '--only', 'fwd+bwd', '-T', '70']) == 0
    out = capsys.readouterr().out
    assert 'naive_recurrent_gla fwd+bwd' in out and 'PASS' in out and 'FAIL' not in out


def test_selfcheck_rows_carry_errors():
    rows = selfcheck(devices=['cpu'], dtypes=[torch.float64, torch.float32], only=['naive_recurrent_gla fwd'], T=40)
    assert [(r.check, r.dtype, r.status) for r in rows] == [
        ('naive_recurrent_gla fwd+bwd', 'float64', 'PASS'), ('naive_recurrent_gla fwd+bwd', 'float32', 'PASS')]
    assert rows[0].err < 1e-12 and 0 < rows[1].err < 1e-6 and rows[1].bound == 1e-5


def test_selfcheck_fails_on_a_wrong_op(monkeypatch, capsys):
    monkeypatch.setattr(myfla_gla, 'naive_recurrent_gla', wrong_naive)
    assert selfcheck_main(['--device', 'cpu', '--dtype', 'float32', '--only', 'naive_recurrent_gla fwd', '-T', '40']) == 1
    out = capsys.readouterr().out
    assert 'FAIL' in out and '1 failed' in out


def test_selfcheck_fails_on_an_exception(monkeypatch):
    def broken(**kwargs):
        raise RuntimeError('boom')
    monkeypatch.setattr(myfla_gla, 'naive_recurrent_gla', broken)
    row, = selfcheck(devices=['cpu'], dtypes=[torch.float32], only=['naive_recurrent_gla fwd'], T=20)
    assert row.status == 'FAIL' and 'RuntimeError: boom' in row.note


def test_selfcheck_fails_on_a_missing_piece(monkeypatch):
    "A piece gone from the package is a failure naming it, not a row that passes quietly."
    monkeypatch.delattr(myfla_gla, 'fused_chunk_gla', raising=False)
    rows = selfcheck(devices=['cpu'], dtypes=[torch.float32], only=['fused_chunk_gla fwd+bwd'], T=20)
    assert len(rows) == 1 and rows[0].status == 'FAIL' and 'fused_chunk_gla' in rows[0].note, rows


def test_fla_comparisons_with_a_stand_in(monkeypatch):
    "The FLA rows' code path, with our own pieces standing in for FLA's (the real ones need CUDA)."
    import myfla_gla.__main__ as sc
    stand_in = {'chunk_gla': myfla_gla.fused_chunk_gla, 'fused_recurrent_gla': myfla_gla.fused_recurrent_gla,
                'GatedLinearAttention': myfla_gla.GatedLinearAttention}
    monkeypatch.setattr(sc, '_fla', stand_in.__getitem__)
    for dtype in (torch.float32, torch.bfloat16):
        for op in ('chunk_gla', 'fused_recurrent_gla'):
            row = sc.run_check('cpu', f'{op} vs FLA', dtype, lambda: sc.check_fla_op(op, 'cpu', dtype, T=70))
            assert row.status == 'PASS' and row.err < sc.FLA_RATIO[dtype] and 'vs float64: FLA' in row.note, row
    row = sc.run_check('cpu', 'layer vs FLA', torch.float32, lambda: sc.check_fla_layer('cpu', torch.float32, T=70))
    assert row.status == 'PASS' and row.err < 1e-5, row
    def nan_fla(**kw):
        o, h = myfla_gla.chunk_gla(**kw)
        return o * float('nan'), h
    monkeypatch.setattr(sc, '_fla', lambda name: nan_fla)
    row = sc.run_check('cpu', 'x', torch.float32, lambda: sc.check_fla_op('chunk_gla', 'cpu', torch.float32, T=70))
    assert row.status == 'PASS' and 'FLA gave NaN/inf in o' in row.note and row.worst == 'ht'
    # on CUDA with FLA the plan has these rows (planned, not run here)
    names = [c[1] for c in sc.plan(devices=['cuda'], fla=True)]
    assert {'chunk_gla vs FLA', 'fused_recurrent_gla vs FLA', 'layer vs FLA (state_dict loaded)'} <= set(names)
    assert not any('FLA' in c[1] for c in sc.plan(devices=['cuda'], fla=False))


def test_python_m_myfla_gla_exit_status(monkeypatch, capsys):
    """The real entry point: status 0 when the checks pass (-T 36: its packed case once gave a false FAIL); its `main`
    (whose value `python -m myfla_gla` exits with) 1 with a wrong op."""
    args = ['--device', 'cpu', '--dtype', 'float32', '--only', 'naive_recurrent_gla fwd', '--only', 'chunk_gla cu_seqlens',
            '-T', '36', '-q']
    ok = subprocess.run([sys.executable, '-m', 'myfla_gla', *args], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert '3 passed, 0 failed' in ok.stdout
    import myfla_gla.__main__ as selfcheck
    monkeypatch.setattr(myfla_gla, 'naive_recurrent_gla', wrong_naive)
    assert selfcheck.main(args) == 1
    assert 'FAIL' in capsys.readouterr().out


# ---------------------------------------------------------------- benchmark

tiny = ['--preset', 'small', '--device', 'cpu', '-B', '1', '-T', '48', '-H', '1', '-K', '8', '-V', '8',
        '--repeats', '2', '--warmup', '1', '-q']


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ('--preset', 'gpu1', 'B=4 T=4096 H=16 K=128 V=128', '--scaling', '--json', '--repeats', '--device',
                 'device to run on', '--compile', '--naive ', '--floor', '--no-floor'):
        assert word in out
    assert '(default: None)' not in out and ') (default' not in out   # no default said twice, none said as None


def test_bench_presets_and_overrides():
    cfg = bench.config_from_args(bench.parse_args(['--preset', 'gpu2', '--device', 'cpu', '-T', '64', '--dtype',
                                                   'float32', '--skip', 'naive_recurrent_gla']))
    assert (cfg.B, cfg.T, cfg.H, cfg.K, cfg.V, cfg.dtype) == (8, 64, 4, 256, 512, 'float32')
    assert 'naive_recurrent_gla' not in cfg.impls and 'chunk_gla (compiled)' not in cfg.impls   # opt-in rows
    assert 'chunk_gla (compiled)' in bench.config_from_args(bench.parse_args(['--compile'])).impls
    assert {'naive_recurrent_gla', 'FLA naive_recurrent_gla'} <= set(bench.config_from_args(bench.parse_args(['--naive'])).impls)
    exported = set(bench.config_from_args(bench.parse_args(['--exported'])).impls) - set(cfg.impls)
    assert exported == set(EXPORTED) and not exported & set(bench.config_from_args(bench.parse_args([])).impls)
    assert bench.PRESETS['cpu'] == dict(B=2, T=4096, H=4, K=128, V=128, dtype='float32')
    assert cfg.floor and not bench.config_from_args(bench.parse_args(['--no-floor'])).floor   # the floor: on by default
    with pytest.raises(SystemExit):
        bench.parse_args(['--preset', 'nope'])


def test_bench_json_record(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'r.json'
    for name in [k for k in os.environ if k.startswith('MYFLA_')]:
        monkeypatch.delenv(name)
    assert bench.main([*tiny, '--naive', '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'implementation' in printed and 'naive_recurrent_gla' in printed and 'fwd+bwd/floor' in printed
    rec = json.loads(out.read_text())
    assert rec['config']['floor'] is True and rec['floor']['fwd_bwd']['floor_ms'] > 0
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']   # written atomically: no temporary file left
    assert rec['kind'] == 'bench' and rec['config']['T'] == 48 and rec['config']['dtype'] == 'float32'
    for key in ('date', 'torch', 'device', 'device_name', 'command', 'threads'):
        assert key in rec['meta']
    assert rec['meta']['command'].startswith('python -m myfla_gla.bench --preset small')
    # the package's switches set in the environment go before it, as a shell would take them
    monkeypatch.setenv('MYFLA_GLA_COMPILED_PASSES', '0')
    assert bench.main([*tiny, '--impl', 'chunk_gla', '--no-floor', '--json', str(out)]) == 0
    assert json.loads(out.read_text())['meta']['command'].startswith(
        'MYFLA_GLA_COMPILED_PASSES=0 python -m myfla_gla.bench --preset small')
    rows = {r['name']: r for r in rec['results']}
    assert set(rows) == {n for n in bench.IMPLS if bench.OPT_IN.get(n) in (None, 'naive')}
    for r in rows.values():
        assert set(r) >= {'status', 'fwd_ms', 'fwd_bwd_ms', 'fwd_peak_mib', 'fwd_bwd_peak_mib', 'err', 'note'}
        assert r['status'] in ('ok', 'n/a'), r
    naive, sdpa = rows['naive_recurrent_gla'], rows['softmax attention (SDPA, causal)']
    assert naive['fwd_ms'] > 0 and naive['fwd_bwd_ms'] is None and naive['err'] < 1e-6
    assert sdpa['fwd_bwd_ms'] > 0 and sdpa['err'] is None and sdpa['fwd_bwd_peak_mib'] > 0
    assert rows['FLA chunk_gla']['status'] == 'n/a'
    for name in ('chunk_gla', 'fused_chunk_gla', 'fused_recurrent_gla', 'GatedLinearAttention (chunk)'):
        if hasattr(myfla_gla, 'GatedLinearAttention' if 'Gated' in name else name):
            assert rows[name]['status'] == 'ok' and rows[name]['fwd_bwd_ms'] > 0
            assert rows[name]['err'] < 1e-5, rows[name]


EXPORTED = ['loop_free_gla (torch.export)', 'loop_free_gla (ONNX Runtime)']


@pytest.mark.skipif(importlib.util.find_spec('onnxruntime') is None or importlib.util.find_spec('onnxscript') is None,
                    reason="onnxruntime or onnxscript is not installed (pip install -e '.[export]')")
def test_bench_exported_rows(tmp_path, capsys):
    """--exported: the op exported once (dynamic batch and length) and timed in eager PyTorch and in ONNX Runtime,
    forward only, with its error against float64; ONNX Runtime with torch's thread count, its memory not measured."""
    out = tmp_path / 'r.json'
    assert bench.main([*tiny, '-T', '100', '--no-floor', '--exported', '--impl', 'chunk_gla', *(
        a for n in EXPORTED for a in ('--impl', n)), '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r['name']: r for r in json.loads(out.read_text())['results']}
    assert list(rows) == ['chunk_gla', *EXPORTED] and all(n in printed for n in EXPORTED)
    eager, ort = rows['loop_free_gla (torch.export)'], rows['loop_free_gla (ONNX Runtime)']
    for r in (eager, ort):
        assert r['status'] == 'ok' and 0 < r['fwd_ms'] < 1e3 and 0 < r['err'] < 1e-5, r
        assert r['fwd_bwd_ms'] is None and r['note'].startswith('forward only (an inference graph)')
    assert 0 < eager['export_s'] < ort['export_s'] and f"exported once in {eager['export_s']:.1f} s" in eager['note']
    assert eager['fwd_peak_mib'] > 0 and ort['fwd_peak_mib'] is None and 'not measured' in ort['note']
    assert ort['ort_threads'] == torch.get_num_threads() and ort['onnxruntime']
    head, body = bench.table_rows(json.loads(out.read_text()))
    cells = {b[0]: dict(zip(head, b)) for b in body}
    assert [cells[n]['fwd+bwd ms'] for n in EXPORTED] == ['-', '-'] and cells[EXPORTED[1]]['fwd MiB'] == '-'


def test_bench_onnx_row_without_onnxruntime(monkeypatch):
    "Without onnxruntime the ONNX row says so in one line (n/a), and nothing is exported."
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnxruntime' else find_spec(name, *a))
    monkeypatch.setattr(bench, '_exported', lambda cfg: pytest.fail('exported without onnxruntime'))
    rec = bench.run_bench(bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, floor=False,
                                            impls=[EXPORTED[1]]), progress=False)
    row, = rec['results']
    assert (row['status'], row['note']) == ('n/a', "onnxruntime is not installed (pip install 'myfla_gla[export]')")
    assert bench.row_line(row, rec['meta']) == f"{EXPORTED[1]}: n/a: {row['note']}"


def test_bench_reports_failures_in_rows(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('boom')
    monkeypatch.setattr(myfla_gla, 'naive_recurrent_gla', broken)
    rec = bench.run_bench(bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, memory=False, floor=False,
                                            impls=['naive_recurrent_gla']), progress=False)
    assert rec['results'][0]['status'] == 'error' and 'boom' in rec['results'][0]['note']
    assert 'error: RuntimeError: boom' in bench.format_table(rec)


def test_fla_naive_is_loaded_by_path(tmp_path, monkeypatch):
    "FLA's pure-PyTorch naive op runs without importing `fla` (whose __init__ needs Triton): a stand-in package shows it."
    pkg = tmp_path / 'fla'
    (pkg / 'ops' / 'gla').mkdir(parents=True)
    (pkg / '__init__.py').write_text('raise ImportError("this stand-in, like FLA without Triton, cannot be imported")\n')
    (pkg / 'ops' / 'gla' / 'naive.py').write_text(
        'from myfla_gla.ops.recurrent import naive_recurrent_gla as _n\n'
        'def naive_recurrent_gla(q, k, v, gk, initial_state=None, output_final_state=False):\n'
        '    return _n(q, k, v, gk, initial_state, output_final_state)\n')
    cfg = bench.BenchConfig(B=1, T=32, H=2, K=8, V=8, repeats=1, warmup=0, memory=False, floor=False,
                            impls=['FLA naive_recurrent_gla'])
    monkeypatch.syspath_prepend(str(tmp_path))
    row, = bench.run_bench(cfg, progress=False)['results']
    assert row['status'] == 'ok' and row['err'] < 1e-6 and row['fwd_ms'] > 0 and row['fwd_bwd_ms'] is None
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    row, = bench.run_bench(cfg, progress=False)['results']
    assert row['status'] == 'n/a' and 'not installed' in row['note']


def test_bench_rounds_keep_the_best():
    rec = bench.run_bench(bench.BenchConfig(B=1, T=32, H=1, K=4, V=4, repeats=1, warmup=1, rounds=3, floor=False,
                                            impls=['fused_recurrent_gla']), progress=False)
    r = rec['results'][0]
    assert rec['config']['rounds'] == 3 and r['status'] == 'ok' and r['err'] < 1e-6
    assert r['fwd_ms'] == r['fwd_min_ms'] and r['fwd_bwd_ms'] == r['fwd_bwd_min_ms']
    assert 'best of 3 rounds' in bench.describe(rec)
    rec['meta']['omp_wait_policy'] = 'PASSIVE'   # the policy is in the heading: it changes CPU times several-fold
    assert '2 threads, OMP_WAIT_POLICY=PASSIVE' in bench.describe({**rec, 'meta': {**rec['meta'], 'threads': 2}})


def test_bench_naive_limit_and_markdown():
    rec = bench.run_bench(bench.BenchConfig(B=1, T=32, H=1, K=4, V=4, repeats=1, warmup=1, naive_max_T=16, floor=False,
                                            impls=['naive_recurrent_gla']), progress=False)
    assert rec['results'][0]['status'] == 'n/a' and 'naive-max-T' in rec['results'][0]['note']
    md = bench.format_table(rec, markdown=True)
    assert md.startswith('| implementation |') and md.count('\n') == 2


def test_bench_floor_columns_are_row_time_over_floor(monkeypatch):
    """The floor is timed once in the run's process with the table's statistic, and each row's time is also given as
    its multiple of the floor's floor_ms: in the table, the markdown, the heading and the line printed per row."""
    real, stats = bench.measure_floor, []
    def spy(*args, **kw):
        stats.append(kw['stat'])
        return real(*args, **kw)
    monkeypatch.setattr(bench, 'measure_floor', spy)
    rec = bench.run_bench(bench.BenchConfig(B=1, T=32, H=1, K=8, V=8, repeats=1, warmup=1, memory=False,
                                            impls=['chunk_gla', 'naive_recurrent_gla']), progress=False)
    fl = rec['floor']
    assert stats == [rec['config']['stat']] == ['min'] and fl['bandwidth_gbs'] > 0
    head, body = bench.table_rows(rec)
    assert head[:7] == ['implementation', 'fwd ms', 'fwd ×', 'fwd/floor', 'fwd+bwd ms', 'fwd+bwd ×', 'fwd+bwd/floor']
    chunk, naive = (dict(zip(head, cells)) for cells in body)
    for col, key, part in (('fwd/floor', 'fwd_ms', 'fwd'), ('fwd+bwd/floor', 'fwd_bwd_ms', 'fwd_bwd')):
        ratio = rec['results'][0][key] / fl[part]['floor_ms']
        assert chunk[col].endswith('x') and float(chunk[col][:-1]) == pytest.approx(ratio, rel=0.01, abs=0.05), (col, ratio)
    assert naive['fwd/floor'] != '-' and naive['fwd+bwd/floor'] == '-'   # forward only: no such time
    first = ' '.join(bench.format_table(rec).split('\nimplementation')[0].split())   # the heading, over lines
    assert f"copy {fl['bandwidth_gbs']:.1f} GB/s" in first and f"floor fwd {fl['fwd']['floor_ms']:.3g} ms" in first
    assert '| fwd/floor |' in bench.format_table(rec, markdown=True)
    assert f"{chunk['fwd/floor']}/{chunk['fwd+bwd/floor']} the floor" in bench.row_line(rec['results'][0], rec['meta'], fl)
    json.dumps(rec)


def test_bench_floor_best_round_and_failure(monkeypatch):
    "With --rounds the floor keeps each part's best round; a floor that fails is a note, and the rows are still measured."
    def fake(products_ms, gbs):
        part = lambda scale: dict(gflop=1., products_ms=products_ms * scale, bytes_ms=1e3 / gbs * scale,
                                  floor_ms=max(products_ms, 1e3 / gbs) * scale)
        return dict(bandwidth_gbs=gbs, fwd=part(1), fwd_bwd=part(3))
    floors = iter([fake(9., 100.), fake(4., 50.)])
    monkeypatch.setattr(bench, 'measure_floor', lambda *a, **k: next(floors))
    cfg = bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, memory=False, error=False, rounds=2,
                            impls=['fused_recurrent_gla'])
    fl = bench.run_bench(cfg, progress=False)['floor']
    assert fl['bandwidth_gbs'] == 100. and fl['fwd'] == dict(gflop=1., products_ms=4., bytes_ms=10., floor_ms=10.)
    assert fl['fwd_bwd']['floor_ms'] == 30.

    def broken(*args, **kwargs):
        raise RuntimeError('no matmuls here')
    monkeypatch.setattr(bench, 'measure_floor', broken)
    rec = bench.run_bench(replace(cfg, rounds=1), progress=False)
    assert rec['floor'] == {'error': 'RuntimeError: no matmuls here'} and rec['results'][0]['status'] == 'ok'
    assert 'floor' not in ' '.join(bench.table_rows(rec)[0])
    assert 'floor not measured (RuntimeError: no matmuls here)' in bench.describe(rec)


def test_bench_records_without_floor_still_format():
    "Records made with --no-floor, or stored before the floor existed, have the table without its columns."
    rec = bench.run_bench(bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, memory=False, floor=False,
                                            impls=['chunk_gla']), progress=False)
    assert 'floor' not in rec and rec['config']['floor'] is False
    assert 'floor' not in bench.format_table(rec) and 'floor' not in bench.format_table(rec, markdown=True)
    stored = root / 'nbs' / 'bench_results'
    old = json.loads((stored / 'cpu.json').read_text())   # as a record stored before the floor existed
    old.pop('floor', None)
    old['config'].pop('floor', None)
    md = bench.record_markdown(old)
    assert '| implementation | fwd ms | fwd × | fwd+bwd ms |' in md and 'floor' not in md
    old_scaling = json.loads((stored / 'cpu_scaling.json').read_text())   # likewise
    old_scaling.pop('floor', None)
    old_scaling['config'].pop('floor', None)
    assert 'floor' not in bench.describe(old_scaling)
    with pytest.raises(TypeError, match='`floor` must be a bool'):
        bench.BenchConfig(floor='no')
    with pytest.raises(ValueError, match="`stat` must be 'median' or 'min'"):
        bench.measure_floor(1, 16, 1, 4, 4, stat='mean')


def test_bench_scaling_json_and_plot(tmp_path, capsys):
    """The record and the plot; the plot through a symlink, which stays (its target gets the image). The summary
    printed gives forward+backward times, and forward times for a row timed forward only."""
    out, png, link = tmp_path / 's.json', tmp_path / 's.png', tmp_path / 'link.png'
    link.symlink_to(png.name)
    code = bench.main([*tiny, '--scaling', '--Ts', '16,32', '--rounds', '2', '--impl', 'naive_recurrent_gla',
                       '--impl', 'softmax attention (SDPA, causal)', '--json', str(out), '--plot', str(link)])
    assert code == 0 and link.is_symlink() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and sorted(p.name for p in tmp_path.iterdir()) == [
        'link.png', 's.json', 's.png']
    rec = json.loads(out.read_text())
    assert rec['kind'] == 'scaling' and rec['config']['Ts'] == [16, 32] and rec['config']['rounds'] == 2
    assert [r['T'] for r in rec['results']['softmax attention (SDPA, causal)']] == [16, 32]
    assert all(r['fwd_bwd_ms'] > 0 for r in rec['results']['softmax attention (SDPA, causal)'])
    assert [f['T'] for f in rec['floor']] == [16, 32] and all(f['fwd_bwd']['floor_ms'] > 0 for f in rec['floor'])
    printed = capsys.readouterr().out
    naive = ', '.join(f"{r['T']}: {r['fwd_ms']:.1f}" for r in rec['results']['naive_recurrent_gla'])
    assert f"{'naive_recurrent_gla':34s} fwd ms      {naive}" in printed.splitlines(), printed
    assert 'softmax attention (SDPA, causal)   fwd+bwd ms  16: ' in printed


def test_bench_scaling_saves_each_length(tmp_path, monkeypatch, capsys):
    "A sweep stopped by Ctrl-C (or a time limit) leaves the lengths it finished in its --json file; Ctrl-C exits 130."
    out, seen = tmp_path / 's.json', []
    real = bench.measure

    def measure(name, inp, **kw):
        if inp.cfg.T == 32:
            seen.append(json.loads(out.read_text()))   # the record as it stood before T=32 began
            raise KeyboardInterrupt
        return real(name, inp, **kw)

    monkeypatch.setattr(bench, 'measure', measure)
    assert bench.main([*tiny, '--no-floor', '--scaling', '--Ts', '16,32', '--impl', 'naive_recurrent_gla',
                       '--json', str(out)]) == 130
    assert [r['T'] for r in seen[0]['results']['naive_recurrent_gla']] == [16]
    final = json.loads(out.read_text())
    assert final['results'] == seen[0]['results'] and final['meta']['interrupted'] is True
    assert 'naive_recurrent_gla' in capsys.readouterr().out


def test_bench_interrupted_prints_and_saves(tmp_path, monkeypatch, capsys):
    "Ctrl-C during the table: the rows measured so far are printed and saved (valid JSON), exit status 130."
    out, real = tmp_path / 'r.json', bench.measure
    def measure(name, inp, *args, **kw):
        if name == 'fused_recurrent_gla':
            raise KeyboardInterrupt
        return real(name, inp, *args, **kw)
    monkeypatch.setattr(bench, 'measure', measure)
    code = bench.main([*tiny, '--no-floor', '--impl', 'chunk_gla', '--impl', 'fused_recurrent_gla', '--json', str(out)])
    assert code == 130
    rec = json.loads(out.read_text())
    assert [r['name'] for r in rec['results']] == ['chunk_gla'] and rec['meta']['interrupted'] is True
    assert rec['results'][0]['fwd_ms'] > 0
    captured = capsys.readouterr()
    assert 'chunk_gla' in captured.out and 'interrupted' in captured.err


def test_bench_ctrl_c_in_a_real_process(tmp_path):
    "SIGINT to `python -m myfla_gla.bench` once its first row is out: exit status 130, that row printed and saved."
    import signal
    out = tmp_path / 'r.json'
    args = [a for a in tiny if a != '-q'] + ['--no-floor', '--repeats', '100000', '--budget', '1000', '--impl', 'FLA chunk_gla',
                                             '--impl', 'fused_recurrent_gla', '--json', str(out)]
    # SIGINT's default action restored in the child: a shell starts a background job (`pytest &`) with SIGINT
    # ignored, which the child would inherit, and Python then leaves it ignored
    p = subprocess.Popen([sys.executable, '-m', 'myfla_gla.bench', *args], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stderr:   # rows are written to stderr as they are measured
            if line.startswith('FLA chunk_gla: n/a'):
                break
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'FLA chunk_gla' in stdout
    rec = json.loads(out.read_text())
    assert rec['meta']['interrupted'] is True and rec['results'][0]['name'] == 'FLA chunk_gla'


@pytest.mark.parametrize('args, message', [
    (['-B', '-1'], 'argument -B: expected an integer of at least 1, got -1'),
    (['--Ts', 'a,b', '--scaling'], "argument --Ts: expected comma-separated positive integers, got 'a,b'"),
    (['--impl', 'bogus'], "argument --impl: unknown implementation 'bogus'"),
    (['--device', 'nodevice'], "argument --device: device 'nodevice' is not available here"),
    (['--plot', 'p.png'], 'argument --plot: only with --scaling'),
])
def test_bench_bad_arguments(args, message, capsys, monkeypatch):
    "A bad command line is one line of error and exit status 2, before anything is measured."
    monkeypatch.setattr(bench, 'measure', lambda *a, **k: pytest.fail('measured despite a bad command line'))
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1].startswith(f'python -m myfla_gla.bench: error: {message}'), err


def test_bench_unwritable_json_fails_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, 'measure', lambda *a, **k: pytest.fail('measured despite an unwritable --json'))
    (tmp_path / 'file').write_text('')
    for path in (tmp_path / 'file' / 'r.json', tmp_path):   # under a file; a directory
        with pytest.raises(SystemExit) as e:
            bench.main([*tiny, '--json', str(path)])
        assert e.value.code == 2 and 'error: argument --json: cannot write' in capsys.readouterr().err


def test_cli_errors_are_one_line_without_traceback(capsys):
    "In a real process: a CUDA device on a build without it is one line of error, status 2; so is the self-check's -T -5."
    cuda = 'cuda' if not torch.cuda.is_available() else 'cuda:99'
    p = subprocess.run([sys.executable, '-m', 'myfla_gla.bench', '--device', cuda], env=env, cwd=root,
                       capture_output=True, text=True)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"python -m myfla_gla.bench: error: argument --device: device '{cuda}'")
    with pytest.raises(SystemExit) as e:
        selfcheck_main(['-T', '-5'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1] == (
        'python -m myfla_gla: error: argument -T/--seq-len: expected an integer of at least 1, got -5')


def test_bench_flags_impossible_readings_and_load():
    rec = bench.run_bench(bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, memory=False, floor=False,
                                            impls=['chunk_gla', 'naive_recurrent_gla']), progress=False)
    rec['meta'].update(cpu_count=2, threads=2, omp_wait_policy=None)
    chunk, naive = rec['results']
    chunk.update(fwd_ms=9.0, fwd_bwd_ms=3.0, load=1.0)    # a forward slower than its forward+backward
    naive.update(load=4.2)                                # a machine busier than its 2 cores
    head, body = bench.table_rows(rec)
    assert body[0][1] == '9.00!' and 'fwd slower than fwd+bwd' in body[0][-1] and 'try --rounds 3' in body[0][-1]
    assert 'OMP_WAIT_POLICY=PASSIVE' in body[0][-1]
    assert body[1][1].endswith('!') and 'load 4.2 on 2 cores' in body[1][-1]
    naive['load'] = 2.3                                   # this run's 2 threads on 2 cores: not flagged
    assert not bench.table_rows(rec)[1][1][-1].endswith('!') and '!' not in bench.table_rows(rec)[1][1][-1]
    md = bench.format_table(rec, markdown=True)
    assert '(`--naive-bwd` for backward)' in md   # a flag in a code span, so that no page renders it with a dash
    rec['meta']['loadavg'] = [2.5, 2, 2]
    assert '! above its 2 cores' in bench.describe(rec)


def test_time_fn_and_cpu_memory():
    import time
    t = bench.time_fn(lambda: time.sleep(0.02), 'cpu', repeats=50, warmup=1, budget=0.1)
    assert t['repeats'] <= 5 and 15 < t['min_ms'] <= t['median_ms'] < 500
    assert bench.time_fn(lambda: None, 'cpu', repeats=3)['repeats'] == 3   # no budget: every repeat
    def grow():
        x = torch.ones(250_000, requires_grad=True)   # 1 MB
        y = (x * 2).exp()                             # 1 MB kept for the backward, 1 MB output
        return torch.autograd.grad(y.sum(), x)[0]     # + the gradient
    peak = bench.peak_memory(grow, 'cpu')
    assert 3_000_000 <= peak <= 6_000_000


def test_cuda_peak_memory_collects_garbage_first(monkeypatch):
    """Garbage of earlier calls, freed by a collection inside the measured call, must not hide its peak. FLA's autograd
    graphs sit in reference cycles: at gpu2 its forward+backward read 64 MiB instead of 1568. Fake CUDA counters."""
    import gc
    mem = dict(now=0, peak=0)

    class Block:   # a CUDA allocation of n bytes, freed with the object
        def __init__(self, n):
            self.n, mem['now'] = n, mem['now'] + n
            mem['peak'] = max(mem['peak'], mem['now'])

        def __del__(self):
            mem['now'] -= self.n

    monkeypatch.setattr(torch.cuda, 'synchronize', lambda: None)
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda: mem.update(peak=mem['now']))
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda: mem['now'])
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda: mem['peak'])
    gc.disable()
    try:
        cycle = [Block(100)]
        cycle.append(cycle)
        del cycle                  # garbage until the next collection
        def call():
            gc.collect()           # a collection that Python starts inside the call
            return Block(60)
        assert bench.peak_memory(call, 'cuda') == 60
    finally:
        gc.enable()


def test_progress_bar():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    f = Terminal()
    p = bench.Progress(3, file=f)
    p.step('a')
    p.print('row a')
    p.step('b')
    p.update(1)                   # a phase not run
    p.close()
    out = f.getvalue()
    assert 'row a\n' in out and '3/3' in out and out.rstrip().split('\r')[-1].startswith('b:')
    f = io.StringIO()   # not a terminal (stderr redirected): the rows, no bar
    p = bench.Progress(2, file=f)
    p.step('a')
    p.print('row a')
    p.close()
    assert f.getvalue() == 'row a\n'
    f = io.StringIO()
    p = bench.Progress(2, file=f, enabled=False)
    p.step('a')
    p.print('row a')
    p.close()
    assert f.getvalue() == ''



# ---------------------------------------------------------------- output streams, FLA's line, --help without torch

def test_stdout_has_only_the_table(tmp_path):
    """Redirected, `python -m myfla_gla.bench` writes the table alone to stdout and no progress-bar text anywhere; the
    FLA rows that cannot run here are one line (which says why) instead of rows of dashes. Without OMP_WAIT_POLICY,
    the command runs with PASSIVE (its record says so)."""
    args = [a for a in tiny if a != '-q'] + ['--no-floor', '--no-memory', '--impl', 'chunk_gla', '--impl', 'FLA chunk_gla',
                                             '--impl', 'FLA fused_recurrent_gla', '--impl', 'FLA GatedLinearAttention (chunk)',
                                             '--json', str(tmp_path / 'r.json')]
    unset = {k: v for k, v in env.items() if k != 'OMP_WAIT_POLICY'}
    p = subprocess.run([sys.executable, '-m', 'myfla_gla.bench', *args], env=unset, cwd=root, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / 'r.json').read_text())['meta']['omp_wait_policy'] == 'PASSIVE'
    out = p.stdout.splitlines()
    assert max(map(len, out)) <= bench.TEXT_WIDTH, p.stdout   # fits a terminal of 88 columns
    head = out.index(next(l for l in out if l.startswith('implementation')))
    assert out[head + 2].startswith('chunk_gla'), p.stdout
    assert '\r' not in p.stdout + p.stderr and 'step/s' not in p.stderr and 'chunk_gla: fwd ' in p.stderr
    fla = 'FLA chunk_gla, FLA fused_recurrent_gla, FLA GatedLinearAttention (chunk): not run ('
    if not torch.cuda.is_available():
        why = ("FLA's kernels need a CUDA device" if importlib.util.find_spec('fla')
               else 'FLA is not installed (pip install flash-linear-attention fla-core)')
        assert ' '.join(' '.join(out[-2:]).split()) == fla + why + ')', out[-2:]   # one line, wrapped
        assert p.stderr.count(why) == 1   # the rows as measured: the reason once


def test_text_table_fits():
    "Columns past TEXT_WIDTH go to a further table that repeats the names; a row of dashes only there is left out."
    head = ['name', 'a', 'b', 'note']
    body = [['x', '1.00', '2.00', ''], ['y', '-', '-', 'not run here']]
    assert bench.text_table(head, body) == ['name     a     b  note', '----  ----  ----  ------------', 'x     1.00  2.00',
                                            'y        -     -  not run here']
    wide = bench.text_table(head, [['x', '1' * 40, '2' * 40, ''], ['y', '-', '-', 'not run here']])
    assert max(map(len, wide)) == bench.TEXT_WIDTH, wide   # the names and two columns of 40: just fits
    assert wide == ['name' + ' ' * 41 + 'a' + ' ' * 41 + 'b', '----  ' + '-' * 40 + '  ' + '-' * 40,
                    'x     ' + '1' * 40 + '  ' + '2' * 40, '', 'name  note', '----  ------------', 'y     not run here']


def test_fla_line_says_why(monkeypatch):
    "Not installed, installed without CUDA: a different line each, in the table and its markdown."
    rec = bench.run_bench(bench.BenchConfig(B=1, T=16, H=1, K=4, V=4, repeats=1, warmup=1, memory=False, floor=False,
                                            impls=['chunk_gla', 'FLA chunk_gla', 'FLA GatedLinearAttention (chunk)']),
                          progress=False)
    names = [b[0] for b in bench.table_rows(rec)[1]]
    assert names == ['chunk_gla'] and len(rec['results']) == 3   # the record keeps every row
    assert ' '.join(' '.join(bench.format_table(rec).splitlines()[-2:]).split()) == (   # wrapped at 88 characters
        "FLA chunk_gla, FLA GatedLinearAttention (chunk): not run (FLA's kernels need a CUDA device)")
    assert bench.format_table(rec, markdown=True).endswith("(FLA's kernels need a CUDA device)  ")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'fla' else find_spec(name, *a))
    assert bench.fla_missing('cpu') == bench.fla_missing('cuda') == (
        'FLA is not installed (pip install flash-linear-attention fla-core)')


def test_bench_keeps_a_wait_policy_it_is_given(monkeypatch):
    "OMP_WAIT_POLICY is set to PASSIVE only by the benchmark's command, and only where it is unset."
    from myfla_gla import cli
    monkeypatch.setattr(sys, 'orig_argv', ['python', '-m', 'myfla_gla.bench', '-T', '5'])
    monkeypatch.setattr(sys, 'argv', ['-m', '-T', '5'])
    monkeypatch.setenv('OMP_WAIT_POLICY', 'ACTIVE')
    cli.before_torch()
    assert os.environ['OMP_WAIT_POLICY'] == 'ACTIVE'
    monkeypatch.delenv('OMP_WAIT_POLICY')
    monkeypatch.setattr(sys, 'orig_argv', ['python', '-m', 'myfla_gla', '-T', '5'])
    cli.before_torch()
    assert 'OMP_WAIT_POLICY' not in os.environ


@pytest.mark.parametrize('module', ['myfla_gla', 'myfla_gla.bench'])
def test_help_imports_no_torch(module):
    "`python -m myfla_gla[.bench] --help` prints the help without importing torch or transformers (-X importtime)."
    p = subprocess.run([sys.executable, '-X', 'importtime', '-m', module, '--help'], env=env, cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith(f"usage: python -m {module.replace('.__main__', '')}"), p.stderr
    imported = {line.rsplit('|', 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith('import time:')}
    assert 'myfla_gla.cli' in imported and 'argparse' in imported   # the log is read
    assert not {m for m in imported if m.split('.')[0] in ('torch', 'transformers', 'numpy')}, sorted(imported)
    if module == 'myfla_gla.bench':
        assert '--generate' in p.stdout and '--new-tokens' in p.stdout


# ---------------------------------------------------------------- the generation benchmark

gen_tiny = ['--generate', '--device', 'cpu', '--layers', '1', '--hidden', '32', '--heads', '2', '--vocab', '50',
            '--prompt', '8', '--new-tokens', '4', '--batch', '1,2', '--contexts', '4,16', '--context-steps', '2', '-q']


def test_generate_record(tmp_path, capsys):
    "--generate at a tiny size: the table, a valid record (rows per batch, the curve), the plot; FLA's row on a CPU: n/a."
    out, png = tmp_path / 'g.json', tmp_path / 'g.png'
    assert bench.main([*gen_tiny, '--skip', 'myfla_gla (compiled step)', '--json', str(out), '--plot', str(png)]) == 0
    printed = capsys.readouterr().out
    assert 'decode ms/token' in printed and 'transformers Llama' in printed
    rec = json.loads(out.read_text())
    assert rec['kind'] == 'generate' and rec['meta']['command'].startswith('python -m myfla_gla.bench --generate')
    assert rec['meta']['transformers'] and rec['meta']['device'] == 'cpu'
    c = rec['config']
    assert (c['layers'], c['hidden'], c['prompt'], c['new_tokens'], c['batch']) == (1, 32, 8, 4, [1, 2])
    assert c['gla_params'] > 0 and c['intermediate_size'] == 256   # 2/3 * 4 * 32, rounded up to 256 (FLA's rule)
    rows = {(r['name'], r['batch']): r for r in rec['results']}
    for name in ('myfla_gla (eager)', 'transformers Llama'):
        for B in (1, 2):
            r = rows[name, B]
            assert r['status'] == 'ok' and r['prefill_ms'] > 0 and r['decode_ms'] > 0 and r['peak_mib'] > 0, r
            assert r['tokens_s'] == pytest.approx(B * 1e3 / r['decode_ms'], rel=1e-6)
    assert rows['myfla_gla (eager)', 1]['same_tokens'] is None and rows['transformers Llama', 1]['same_tokens'] is None
    if not torch.cuda.is_available():
        assert rows['FLA GLAForCausalLM', None]['status'] == 'n/a'
    for name in ('myfla_gla (eager)', 'transformers Llama'):
        assert [p['T'] for p in rec['contexts'][name]] == [4, 16] and all(p['decode_ms'] > 0 for p in rec['contexts'][name])
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert max(map(len, printed.splitlines())) <= bench.TEXT_WIDTH, printed
    md = bench.format_generate(rec, markdown=True).splitlines()   # the curve: a row per implementation, a column per T
    eager = rec['contexts']['myfla_gla (eager)']
    assert '| implementation | 4 | 16 |' in md
    assert f"| myfla_gla (eager) | {eager[0]['decode_ms']:.2f} | {eager[1]['decode_ms']:.2f} |" in md, md


def test_generate_same_tokens_as_simple_generate():
    "The benchmark's loop decodes what the package's own loop does, through the model and through DecodeStep."
    cfg = bench.GenConfig(layers=1, hidden=32, heads=2, vocab=50, prompt=8, new_tokens=5, batch=[2], contexts=[])
    gla = bench.gla_model(cfg)
    ids = torch.randint(50, (2, 8))
    want = myfla_gla.simple_generate(gla, ids, max_new_tokens=5)[:, 8:].tolist()
    assert bench.greedy(bench.hf_runner(gla), ids, 5, 'cpu')[2] == want
    assert bench.greedy(bench.step_runner(gla, 2), ids, 5, 'cpu')[2] == want
