"""Where the GPU time of `chunk_gla` goes, at the gpu1 shape (bf16), in one process on one card:

    python tests/gpu/where_time_goes.py [reduce-overhead] [tf32] [fla] [profile]

Times the forward and forward+backward (`myfla_gla.bench.time_fn`: median of 20 calls, CUDA events) eager and
`torch.compile`d, and, as asked, compiled with CUDA graphs (`mode='reduce-overhead'`), with TF32 products
(`torch.set_float32_matmul_precision('high')`) and FLA's `chunk_gla`. `profile` adds a torch.profiler table of five
eager and five compiled forward+backward calls, the eager one with the stages of the chunk form labelled
(`myfla::_intra_attention`, `myfla::_walk`, ...). The chunk chapter's "Speed and memory" quotes an H100 run."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import myfla_gla.ops.chunk as chunk
from myfla_gla import bench, chunk_gla

STAGES = ['_chunk_fwd', '_intra_attention', '_walk', '_chunk_bwd', '_intra_grads', '_intra_bwd', '_dg', '_finish_grads']

inp = bench.Inputs(bench.BenchConfig(**bench.PRESETS['gpu1'], device='cuda'))
q, k, v, g = inp.q, inp.k, inp.v, inp.g
do = torch.randn_like(v)


def calls(op, graphs=False):
    "The forward and the forward+backward of `op` on the inputs above."
    def step():   # CUDA graphs: the previous call's outputs may be overwritten
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
    def fwd():
        step()
        with torch.no_grad():
            return op(q, k, v, g)[0]
    def fwd_bwd():
        step()
        return torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
    return fwd, fwd_bwd


def run(name, op, graphs=False):
    "Forward and forward+backward time of `op`, and its error against the float64 recurrence."
    fwd, fwd_bwd = calls(op, graphs)
    t1, t2 = (bench.time_fn(f, 'cuda', repeats=20, warmup=3) for f in (fwd, fwd_bwd))
    print(f"{name:40s} fwd {t1['median_ms']:6.2f} ms  fwd+bwd {t2['median_ms']:6.2f} ms  "
          f"err vs f64 {bench.get_err_ratio(inp.op_ref(), fwd()):.2e}  (first calls {t1['first_s'] + t2['first_s']:.0f} s)",
          flush=True)


def labelled(name, f):
    "`f` running inside a profiler range named after it."
    def run(*args, **kwargs):
        with record_function('myfla::' + name):
            return f(*args, **kwargs)
    return run


def profile_table(label, op):
    "torch.profiler's table of five forward+backward calls of `op`, by GPU time."
    fwd_bwd = calls(op)[1]
    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd_bwd()
        torch.cuda.synchronize()
    print(f'===== {label}: 5 forward+backward calls', flush=True)
    print(prof.key_averages().table(sort_by='device_time_total', row_limit=50, max_name_column_width=60), flush=True)


compiled = torch.compile(chunk_gla)
run('chunk_gla', chunk_gla)
run('chunk_gla (compiled)', compiled)
if 'profile' in sys.argv:
    originals = {name: getattr(chunk, name) for name in STAGES}
    for name, f in originals.items():   # labels for eager only: the compiled op traced the functions unlabelled
        setattr(chunk, name, labelled(name, f))
    profile_table('eager', chunk_gla)
    for name, f in originals.items():
        setattr(chunk, name, f)
    profile_table('compiled', compiled)
if 'reduce-overhead' in sys.argv:
    run('chunk_gla (compiled, reduce-overhead)', torch.compile(chunk_gla, mode='reduce-overhead'), graphs=True)
if 'tf32' in sys.argv:
    torch.set_float32_matmul_precision('high')
    run('chunk_gla (TF32)', chunk_gla)
    run('chunk_gla (compiled, TF32)', torch.compile(chunk_gla))
if 'fla' in sys.argv:
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    run('FLA chunk_gla', lambda *x: fla_chunk_gla(*x))
