"""The command lines `python -m myfla_gla`, `python -m myfla_gla.bench` and `python -m myfla_gla.distributed`: every
option has a domain, and a value outside it is an argparse error (exit status 2, one line of error, no traceback)
raised while the command line is read, before anything runs (torch.distributed included). The parsers run in-process;
one real process shows the exit status. Files the commands write: a symlink is written through, a directory, FIFO or
device is refused. The self-check's own cases are valid at every length -T N."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from myfla_gla import __main__ as selfcheck_cli, bench, distributed
from myfla_gla.__main__ import packed_boundaries, selfcheck, unwritable, write_atomically

root = Path(__file__).resolve().parent.parent
TORCHRUN = dict(RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='1')   # as torchrun sets them


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "Paths of every kind: a directory, a FIFO, a device, a path under a file, a symlink to a FIFO, a symlink loop."
    d = tmp_path_factory.mktemp('files')
    (d / 'file').write_text('')
    os.mkfifo(d / 'fifo')
    (d / 'to_fifo').symlink_to('fifo')
    (d / 'loop').symlink_to('loop')
    return {'dir': str(d), 'fifo': str(d / 'fifo'), 'device': '/dev/null', 'under_file': str(d / 'file' / 'x.json'),
            'to_fifo': str(d / 'to_fifo'), 'loop': str(d / 'loop'), 'new': str(d / 'new' / 'r.json'),
            'png': str(d / 'p.png')}


def parse(cli, argv, environ=None):
    "(exit status, the last line on stderr) of reading `argv` with `cli`'s parser; (0, '') when it is accepted."
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            if cli is distributed:
                cli.parse_args(argv, environ={} if environ is None else environ)
            else:
                cli.parse_args(argv)
        except SystemExit as e:
            return e.code, (err.getvalue().splitlines() or [''])[-1]
    return 0, ''


SELF = 'python -m myfla_gla: error: argument '
BENCH = 'python -m myfla_gla.bench: error: argument '
DIST = 'python -m myfla_gla.distributed: error: argument '
POS_INT = 'expected an integer of at least 1, got'
POS_FLOAT = 'expected a finite number above 0, got'

CASES = [  # (cli, argv, environ for distributed, the error's start or None where the command line is accepted)
    (selfcheck_cli, [], None, None),
    (selfcheck_cli, ['-T', '1', '--device', 'cpu', '--dtype', 'float32', '--only', 'cu_seqlens', '-q', '--no-fla'], None, None),
    (selfcheck_cli, ['-T', '0'], None, SELF + f'-T/--seq-len: {POS_INT} 0'),
    (selfcheck_cli, ['-T', '2.5'], None, SELF + f"-T/--seq-len: {POS_INT} '2.5'"),
    (selfcheck_cli, ['--device', 'meta'], None, SELF + "--device: device 'meta' holds no data"),
    (selfcheck_cli, ['--device', 'nodevice'], None, SELF + "--device: device 'nodevice' is not available here"),
    (selfcheck_cli, ['--dtype', 'int8'], None, SELF + "--dtype: invalid choice: 'int8'"),
    (selfcheck_cli, ['--only', 'no such check'], None, SELF + "--only: no check's name contains 'no such check'"),
    (selfcheck_cli, ['--only', 'cu_seqlens', '--dtype', 'bfloat16', '--device', 'cpu'], None, SELF + '--only: no check'),
    (bench, [], None, None),
    (bench, ['--scaling', '--Ts', '16,32', '--max-s', '0.5', '--normalizer', '16', '--budget', '1e-3'], None, None),
    (bench, ['--json', ''], None, None),
    *[(bench, [opt, v], None, BENCH + f'{opt}: {POS_FLOAT} {v}')
      for opt in ('--normalizer', '--budget') for v in ('nan', 'inf', '0', '-1')],
    (bench, ['--normalizer', 'x'], None, BENCH + "--normalizer: expected a positive number, got 'x'"),
    (bench, ['--scaling', '--max-s', '-1'], None, BENCH + f'--max-s: {POS_FLOAT} -1'),
    *[(bench, [opt, '0'], None, BENCH + f'{opt}: {POS_INT} 0')
      for opt in ('-B', '-T', '-H', '-K', '-V', '--repeats', '--warmup', '--rounds', '--naive-max-T')],
    (bench, ['--scaling', '--Ts', '16,0'], None, BENCH + "--Ts: expected comma-separated positive integers, got '16,0'"),
    *[(bench, args, None, BENCH + f'{args[0]}: only with --scaling')
      for args in (['--Ts', '16'], ['--max-s', '5'], ['--plot', 'p.png'])],
    (bench, ['--scaling', '--plot', 'p.nope'], None, BENCH + "--plot: matplotlib writes no 'nope' images"),
    (bench, ['--preset', 'nope'], None, BENCH + "--preset: invalid choice: 'nope'"),
    (bench, ['--dtype', 'int8'], None, BENCH + "--dtype: invalid choice: 'int8'"),
    (bench, ['--stat', 'mean'], None, BENCH + "--stat: invalid choice: 'mean'"),
    (bench, ['--impl', 'bogus'], None, BENCH + "--impl: unknown implementation 'bogus'"),
    (bench, ['--skip', 'bogus'], None, BENCH + "--skip: unknown implementation 'bogus'"),
    (bench, ['--impl', 'chunk_gla', '--skip', 'chunk_gla'], None, BENCH + '--skip: no implementation is left to run'),
    (bench, ['--device', 'meta'], None, BENCH + "--device: device 'meta' holds no data"),
    (bench, ['--generate', '--layers', '2', '--batch', '1,4', '--contexts', '8', '--new-tokens', '3'], None, None),
    (bench, ['--generate', '--exported', '--impl', 'myfla_gla (ONNX Runtime)', '--compile-mode', 'reduce-overhead'], None, None),
    (bench, ['--layers', '2'], None, BENCH + '--layers: only with --generate'),
    (bench, ['--no-contexts'], None, BENCH + '--no-contexts: only with --generate'),
    (bench, ['--generate', '-T', '5'], None, BENCH + '-T: not with --generate'),
    (bench, ['--generate', '--preset', 'cpu'], None, BENCH + '--preset: not with --generate'),
    (bench, ['--generate', '--impl', 'chunk_gla'], None, BENCH + "--impl: 'chunk_gla' is not a row of --generate"),
    (bench, ['--impl', 'transformers Llama'], None, BENCH + "--impl: 'transformers Llama' is only a row of --generate"),
    (bench, ['--generate', '--batch', '1,0'], None, BENCH + "--batch: expected comma-separated positive integers"),
    (bench, ['--generate', '--compile-mode', 'fast'], None, BENCH + "--compile-mode: invalid choice: 'fast'"),
    (bench, ['--plot', 'p.png'], None, BENCH + '--plot: only with --scaling or --generate'),
    (distributed, ['--strategy', 'single'], None, None),
    (distributed, ['--comm-bytes'], None, None),                       # spawns its own groups: no torchrun needed
    (distributed, ['--strategy', 'cp', '--batch-size', '2', '--seq-len', '3'], TORCHRUN, None),
    (distributed, ['--steps', '0'], TORCHRUN, DIST + f'--steps: {POS_INT} 0'),
    (distributed, ['--steps', '-3'], TORCHRUN, DIST + f'--steps: {POS_INT} -3'),
    (distributed, ['--batch-size', '0'], TORCHRUN, DIST + f'--batch-size: {POS_INT} 0'),
    (distributed, ['--seq-len', '1'], TORCHRUN, DIST + '--seq-len: expected an integer of at least 2, got 1'),
    (distributed, ['--strategy', 'tp'], TORCHRUN, DIST + "--strategy: invalid choice: 'tp'"),
    (distributed, ['--strategy', 'ddp'], {}, DIST + '--strategy: ddp runs under torchrun, which sets RANK, WORLD_SIZE'),
    (distributed, ['--strategy', 'fsdp', '--batch-size', '3'], TORCHRUN,
     DIST + '--batch-size: `batch_size` 3 must be divisible by the 2 ranks'),
    (distributed, ['--strategy', 'cp', '--batch-size', '1', '--seq-len', '3'], TORCHRUN,
     DIST + '--batch-size: `batch_size` * `seq_len` = 3 tokens must be divisible by the 2 ranks'),
]


@pytest.mark.parametrize('cli, argv, environ, error', CASES,
                         ids=[f"{c.__name__.split('.')[-1]} {' '.join(a) or '(none)'}" for c, a, _, _ in CASES])
def test_every_option_has_a_domain(cli, argv, environ, error, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)    # relative output paths: a writable folder
    code, line = parse(cli, argv, environ)
    if error is None:
        assert code == 0, line
    else:
        assert code == 2 and line.startswith(error), line


@pytest.mark.parametrize('kind, why', [('dir', 'it is a directory'), ('fifo', 'it is a FIFO'),
                                       ('device', 'it is a character device'), ('under_file', 'Not a directory'),
                                       ('to_fifo', 'its target'), ('loop', '')])
def test_output_files_are_regular(files, kind, why):
    "--json, --plot and --out refuse a path that is not a regular file (a symlink counts as its target), naming why."
    path = files[kind]
    for cli, argv in ((bench, ['--json', path]), (bench, ['--scaling', '--plot', path + '.png' * (kind == 'device')]),
                      (distributed, ['--strategy', 'single', '--out', path])):
        if kind == 'device' and '--plot' in argv:
            continue          # /dev/null.png is no device
        code, line = parse(cli, argv)
        assert code == 2 and f'cannot write {path}' in line and why in line, (argv, line)
    with pytest.raises(ValueError, match='cannot write'):
        write_atomically(path, lambda tmp: pytest.fail('wrote to a path that is not a regular file'))
    assert not Path(files['fifo']).is_file() and Path(files['fifo']).exists()   # the FIFO is still there


def test_writes_go_through_symlinks_atomically(tmp_path, monkeypatch, capsys):
    "bench --json and distributed --out write a symlink's target (the link stays); the target keeps its mode."
    target, link = tmp_path / 'real.json', tmp_path / 'link.json'
    target.write_text('{}')
    target.chmod(0o600)
    link.symlink_to(target.name)
    assert bench.main(['--preset', 'small', '--device', 'cpu', '-B', '1', '-T', '16', '-H', '1', '-K', '4', '-V', '4',
                       '--repeats', '1', '--warmup', '1', '--no-floor', '--no-memory', '--impl', 'fused_recurrent_gla',
                       '-q', '--json', str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())['kind'] == 'bench'
    assert oct(target.stat().st_mode & 0o777) == oct(0o600) and sorted(p.name for p in tmp_path.iterdir()) == [
        'link.json', 'real.json']                 # no temporary file left
    distributed.main(['--strategy', 'single', '--steps', '2', '--batch-size', '1', '--seq-len', '4', '--out', str(link)])
    losses = json.loads(target.read_text())
    assert link.is_symlink() and len(losses) == 2 and all(0 < x < 10 for x in losses)
    dangling = tmp_path / 'dangling.json'     # a dangling symlink: its target is made
    dangling.symlink_to('sub/made.json')
    distributed.main(['--strategy', 'single', '--steps', '1', '--batch-size', '1', '--seq-len', '2', '--out', str(dangling)])
    assert dangling.is_symlink() and len(json.loads((tmp_path / 'sub' / 'made.json').read_text())) == 1
    distributed.main(['--strategy', 'single', '--steps', '1', '--batch-size', '1', '--seq-len', '2', '--out', ''])
    assert "--out '': no file is written" in capsys.readouterr().err


def test_bench_json_empty_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert bench.main(['--device', 'cpu', '-B', '1', '-T', '16', '-H', '1', '-K', '4', '-V', '4', '--repeats', '1',
                       '--warmup', '1', '--no-floor', '--no-memory', '--impl', 'fused_recurrent_gla', '-q',
                       '--json', '']) == 0
    assert "--json '': no file is written" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_unwritable_names_the_reason(files):
    assert unwritable(files['new']) is None and unwritable(files['png']) is None   # absent: made when written
    assert unwritable(files['to_fifo']).startswith(f"its target {os.path.realpath(files['fifo'])} is a FIFO")


@pytest.mark.parametrize('T', [1, 2, 36, 37, 38])
def test_selfcheck_cases_at_every_length(T):
    "The packed, decoding and padding checks build valid cases at any -T (a false FAIL at T <= 36 before)."
    cu = packed_boundaries(T)
    assert cu[0] == 0 and cu[-1] == T and cu[1] == cu[2] >= 1 and all(a <= b for a, b in zip(cu, cu[1:]))
    rows = selfcheck(devices=['cpu'], dtypes=[torch.float32], only=['chunk_gla cu_seqlens', 'Cache', 'padding'],
                     fla=False, T=T)
    assert len(rows) == 4 and all(r.status == 'PASS' and r.err < 1e-4 for r in rows), rows


def test_argument_errors_in_a_real_process():
    "Under torchrun's environment, --steps 0 ends with exit status 2 and one line, before torch.distributed starts."
    env = dict(os.environ, **TORCHRUN, PYTHONPATH=str(root) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    p = subprocess.run([sys.executable, '-m', 'myfla_gla.distributed', '--steps', '0'], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and p.stdout == '', p.stderr
    assert p.stderr.splitlines()[-1] == DIST + f'--steps: {POS_INT} 0'


FREE_TEXT = {('python -m myfla_gla', '--only')}   # any text is a valid filter (one that matches nothing is an error)


def test_every_option_declares_its_domain():
    "The class: an option that takes a value has a `type=` that checks it, or `choices`; only a filter takes any text."
    for cli in (selfcheck_cli, bench, distributed):
        p = cli.make_parser()
        for action in p._actions:
            if action.nargs == 0 or action.dest == 'help':   # flags
                continue
            opt = action.option_strings[-1]
            assert action.type is not None or action.choices is not None or (p.prog, opt) in FREE_TEXT, (p.prog, opt)


def test_selfcheck_dtype_the_device_lacks(monkeypatch):
    "A dtype that no check runs in on the devices asked for (bfloat16 on an old GPU, float64 on mps) is an argument error."
    monkeypatch.setattr(selfcheck_cli, 'check_dtypes', lambda device: [torch.float32])
    assert parse(selfcheck_cli, ['--dtype', 'float16', '--device', 'cpu']) == (2, SELF + '--dtype: no check runs in float16 on cpu')
    assert parse(selfcheck_cli, ['--dtype', 'float16', '--dtype', 'float32', '--device', 'cpu']) == (0, '')


@pytest.mark.parametrize('kw, message', [
    (dict(steps=0), '`steps` must be an int of at least 1, got 0'),
    (dict(batch_size=-2), '`batch_size` must be an int of at least 1, got -2'),
    (dict(seq_len=1), '`seq_len` must be an int of at least 2, got 1'),
    (dict(lr=float('nan')), '`lr` must be a finite number above 0, got nan'),
])
def test_train_refuses_what_cannot_train(kw, message):
    "`train` itself, as the command calls it: what would end in an IndexError or a NaN loss is a ValueError first."
    with pytest.raises(ValueError, match=message.replace('`', '.').replace('(', r'\(')):
        distributed.train('cp', **kw)      # raised before torch.distributed is started
    assert not torch.distributed.is_initialized()
