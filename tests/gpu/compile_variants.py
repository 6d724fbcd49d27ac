"""Where does the GPU time of `chunk_gla` go? Times it at the gpu1 shape eager, `torch.compile`d, with CUDA graphs
(`mode='reduce-overhead'`) and with TF32 products, against FLA's `chunk_gla`, in one process on one card:

    python tests/gpu/compile_variants.py [reduce-overhead] [tf32] [fla]

Each time is the median of 20 calls, each synchronised (so slightly above the benchmark's CUDA-event times). On an
H100 (2026-11-27) TF32 and CUDA graphs each changed the compiled forward+backward by under 5%: the time is memory
traffic, not matmul precision or kernel launches (the chunk chapter's "Speed and memory")."""
import sys
import time

import torch

from myfla_gla import bench, chunk_gla

inp = bench.Inputs(bench.BenchConfig(**bench.PRESETS['gpu1'], device='cuda'))
q, k, v, g = inp.q, inp.k, inp.v, inp.g
do = torch.randn_like(v)


def median_ms(f, n=20):
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def run(name, op, graphs=False):
    "Forward and forward+backward time of `op`, and its error against the float64 recurrence."
    def step():   # CUDA graphs: outputs of the previous call may be overwritten
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
    def fwd():
        step()
        with torch.no_grad():
            return op(q, k, v, g)[0]
    def fwd_bwd():
        step()
        return torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
    t0 = time.perf_counter()
    fwd_bwd(), fwd()
    first = time.perf_counter() - t0
    print(f'{name:40s} fwd {median_ms(fwd):6.2f} ms  fwd+bwd {median_ms(fwd_bwd):6.2f} ms  '
          f'err vs f64 {bench.get_err_ratio(inp.op_ref(), fwd()):.2e}  (first calls {first:.0f} s)', flush=True)


run('chunk_gla', chunk_gla)
run('chunk_gla (compiled)', torch.compile(chunk_gla))
if 'reduce-overhead' in sys.argv:
    run('chunk_gla (compiled, reduce-overhead)', torch.compile(chunk_gla, mode='reduce-overhead'), graphs=True)
if 'tf32' in sys.argv:
    torch.set_float32_matmul_precision('high')
    run('chunk_gla (TF32)', chunk_gla)
    run('chunk_gla (compiled, TF32)', torch.compile(chunk_gla))
if 'fla' in sys.argv:
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    run('FLA chunk_gla', lambda *x: fla_chunk_gla(*x))
