"""The speed leads of the chunk chapter's design notes, at the gpu1 shape (bf16), in one process on one card:

    python tests/gpu/chunk_leads.py [eager] [fla] [compile] [--eager NAMES] [--compiled NAMES] [--json PATH]

`eager` times `chunk_gla`'s forward and forward+backward (`myfla_gla.bench.time_fn`: median of 20 calls, CUDA events),
peak memory and error against the float64 recurrence for each switchable variant of `myfla_gla.ops.chunk`: the
smallest levels as broadcast products (`_BROADCAST_ROWS`), the forward's chunk states kept for the backward
(`_KEEP_STATES`). `fla` adds FLA's Triton `chunk_gla` (autotuned by its first calls, then timed the same way);
`compile` the `torch.compile`d op for the variants in `COMPILED`; `--eager`/`--compiled` select variants by name (comma-
separated). 'default' is the module's own setting. Also prints the floor (`myfla_gla.floor`)."""
import json
import sys

import torch

import myfla_gla.ops.chunk as chunk
from myfla_gla import bench, chunk_gla
from myfla_gla.floor import floor

inp = bench.Inputs(bench.BenchConfig(**bench.PRESETS['gpu1'], device='cuda'))
q, k, v, g = inp.q, inp.k, inp.v, inp.g
do = torch.randn_like(v)
results = []

EAGER = {'dyadic levels': dict(rows=0, keep=False), 'broadcast m<=1': dict(rows=1, keep=False),
         'broadcast m<=2': dict(rows=2, keep=False), 'broadcast m<=4': dict(rows=4, keep=False),
         'broadcast m<=8': dict(rows=8, keep=False), 'kept states': dict(rows=0, keep=True),
         'broadcast m<=2, kept states': dict(rows=2, keep=True), 'broadcast m<=4, kept states': dict(rows=4, keep=True),
         'dyadic levels (again)': dict(rows=0, keep=False), 'default': {}}
COMPILED = {'dyadic levels': dict(rows=0, keep=False), 'broadcast m<=4, kept states': dict(rows=4, keep=True),
            'default': {}}
DEFAULT = dict(rows=chunk._BROADCAST_ROWS['cuda'], keep=chunk._KEEP_STATES['cuda'])
if '--compiled' in sys.argv:   # a comma-separated selection of COMPILED
    COMPILED = {k: COMPILED[k] for k in sys.argv[sys.argv.index('--compiled') + 1].split(',')}
if '--eager' in sys.argv:
    EAGER = {k: EAGER[k] for k in sys.argv[sys.argv.index('--eager') + 1].split(',')}


def variant(rows=DEFAULT['rows'], keep=DEFAULT['keep']):
    chunk._BROADCAST_ROWS['cuda'], chunk._KEEP_STATES['cuda'] = rows, keep


def run(name, op):
    "Forward and forward+backward time, peak memory and error against the float64 recurrence of `op`."
    def fwd():
        with torch.no_grad():
            return op(q, k, v, g)[0]
    def fwd_bwd():
        return torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
    t1, t2 = (bench.time_fn(f, 'cuda', repeats=20, warmup=3) for f in (fwd, fwd_bwd))
    m1, m2 = (bench.peak_memory(f, 'cuda') / 2**20 for f in (fwd, fwd_bwd))
    r = dict(name=name, fwd_ms=t1['median_ms'], fwd_bwd_ms=t2['median_ms'], fwd_peak_mib=m1, fwd_bwd_peak_mib=m2,
             err=bench.get_err_ratio(inp.op_ref(), fwd()), first_s=t1['first_s'] + t2['first_s'])
    results.append(r)
    print(f"{name:45s} fwd {r['fwd_ms']:6.2f} ms  fwd+bwd {r['fwd_bwd_ms']:6.2f} ms  peak {m1:6.0f} / {m2:6.0f} MiB  "
          f"err {r['err']:.2e}  (first calls {r['first_s']:.0f} s)", flush=True)


fl = floor(4, 4096, 16, 128, 128, torch.bfloat16, 'cuda')
print('floor', json.dumps(fl), flush=True)
results.append(dict(name='floor', **fl))
if 'eager' in sys.argv:
    for name, kw in EAGER.items():
        variant(**kw)
        run(name, chunk_gla)
    variant()
if 'fla' in sys.argv:
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    run('FLA chunk_gla', lambda *x: fla_chunk_gla(*x))
if 'compile' in sys.argv:
    for name, kw in COMPILED.items():
        torch._dynamo.reset()
        variant(**kw)
        compiled = torch.compile(chunk_gla)
        run(name + ' (compiled)', compiled)
        got = torch.autograd.grad(compiled(q, k, v, g)[0], (q, k, v, g), do)
        variant(rows=0, keep=False)
        want = torch.autograd.grad(chunk_gla(q, k, v, g)[0], (q, k, v, g), do)
        print('  gradients against eager dyadic levels, largest relative RMS difference:',
              f"{max(bench.get_err_ratio(w.double(), x.double()) for w, x in zip(want, got)):.1e}", flush=True)
    variant()
if '--json' in sys.argv:
    with open(sys.argv[sys.argv.index('--json') + 1], 'w') as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=' '.join(sys.argv),
                       results=results), f, indent=1)
