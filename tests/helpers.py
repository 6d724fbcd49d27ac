"""Helpers shared by test files (a module of its own: `conftest` is also the name of tests/gpu's conftest.py).

`run_with_fla`: a script run in a fresh process beside FLA 0.6.0's own classes (FLA-written checkpoints, FLA's
layers on the CPU). `cp_layer_errors`: a layer run by one process and by the ranks of a context-parallel group.
`threads`: torch's CPU thread count within a block. `run_with_compiled_passes`: `chunk_gla` with its layout passes
eager and compiled. `host_reads`: how often a call reads tensor values on the host."""
import contextlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def threads(n):
    "Within the block, torch's CPU ops use `n` threads; the count before is restored after."
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_with_compiled_passes(monkeypatch, x, **kw):
    """`chunk_gla`'s outputs and gradients on the op inputs `x` (`myfla_gla.testing.run_op`) with the layout passes
    eager, and compiled (`_COMPILED_PASSES` on for x's device), and the kinds of the passes compiled, in call order."""
    import myfla_gla.ops.chunk as chunk
    from myfla_gla import chunk_gla
    from myfla_gla.testing import run_op
    device = x['q'].device.type
    monkeypatch.setitem(chunk._COMPILED_PASSES, device, False)
    eager = run_op(chunk_gla, x, **kw)
    monkeypatch.setitem(chunk._COMPILED_PASSES, device, True)
    monkeypatch.setattr(chunk, '_COMPILED_MIN_NUMEL', 0)
    ran, compiled = [], chunk._compiled
    monkeypatch.setattr(chunk, '_compiled', lambda op, *args: compiled(op, *args) and (ran.append(op) or True))
    out = run_op(chunk_gla, x, **kw)
    monkeypatch.setattr(chunk, '_compiled', compiled)
    return eager, out, ran


_FLA_PREAMBLE = '''\
import importlib.util, json, sys
if importlib.util.find_spec('fla') is None:
    print('SKIP ModuleNotFoundError: no module named fla'); sys.exit(0)
import torch
sys.path.insert(0, {tests!r})
import flash_attn_ref
flash_attn_ref.install()               # before FLA imports flash_attn: FLA's Attention builds without flash-attn
import myfla_gla                       # registered first ...
try:
    import fla                         # ... then FLA registers the same model types: no error
    assert fla.__version__ == '0.6.0', fla.__version__
{imports}
except Exception as e:
    print('SKIP', type(e).__name__, e); sys.exit(0)
'''


def run_with_fla(imports: str, script: str, *args) -> str:
    """Run `script` (its arguments in `sys.argv[1:]`) in a fresh process that imported myfla_gla, then FLA 0.6.0 and
    `imports` from it (FLA's kernels never run on the CPU; flash-attn is `flash_attn_ref`); its stdout. The test is
    skipped if FLA 0.6.0 does not import here."""
    import os
    import subprocess
    import textwrap
    from pathlib import Path
    imports = textwrap.indent(textwrap.dedent(imports).strip(), '    ')
    code = _FLA_PREAMBLE.format(tests=str(Path(__file__).parent), imports=imports) + textwrap.dedent(script)
    run = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, 'PYTHONWARNINGS': 'ignore'}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith('SKIP'):
        pytest.skip(f'FLA 0.6.0 does not import here: {run.stdout.strip()}')
    return run.stdout


def cp_layer_errors(layer, rank: int, world: int, cu: list, conv1d_kernel_size=None, **kwargs):
    """A float64 layer run once on the whole packed batch `cu` and, on each of `world` ranks, on its share with
    `cp_context`: `(errors, received)`, this rank's relative errors of the output, dx and every parameter's gradient
    (summed over the ranks), and the bytes it received in its forward. `kwargs` go to both forwards; x and the
    output's gradient are drawn from the global generator."""
    import torch.distributed as dist
    from myfla_gla.ops.cp import COMM_BYTES, build_cp_context, reset_comm_bytes
    from myfla_gla.utils import get_err_ratio
    T, C = cu[-1], layer.hidden_size
    x = torch.randn(1, T, C, dtype=torch.float64, requires_grad=True)
    do = torch.randn(1, T, C, dtype=torch.float64)
    o = layer(x, cu_seqlens=torch.tensor(cu), **kwargs)[0]
    o.backward(do)
    ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    sl = slice(rank * T // world, (rank + 1) * T // world)
    xl = x.detach()[:, sl].requires_grad_()
    conv = {} if conv1d_kernel_size is None else {'conv1d_kernel_size': conv1d_kernel_size}
    reset_comm_bytes()
    ol = layer(xl, cp_context=build_cp_context(torch.tensor(cu), None, **conv), **kwargs)[0]
    received = COMM_BYTES['received']
    ol.backward(do[:, sl])
    errs = {'o': get_err_ratio(o[:, sl], ol), 'dx': get_err_ratio(x.grad[:, sl], xl.grad)}
    for n, p in layer.named_parameters():
        dist.all_reduce(p.grad)
        errs[n] = get_err_ratio(ref[n], p.grad)
    return errs, received


class HostReads(TorchFunctionMode):
    "Counts the host's reads of tensor values in the block (`bool`, `int`, `item`, `tolist`): on a GPU each waits for it."
    READS = {'__bool__', '__int__', '__index__', '__float__', 'item', 'tolist'}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, '__name__', None) in self.READS
        return func(*args, **(kwargs or {}))


def host_reads(fn):
    "How many times `fn()` reads tensor values on the host."
    with HostReads() as reads:
        fn()
    return reads.n
