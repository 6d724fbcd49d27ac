"""Where the GPU time of `chunk_gla`'s forward+backward goes, at the gpu1 shape (bf16): a torch.profiler table of
five eager calls, the stages of the chunk form labelled (`myfla::_intra_attention`, `myfla::_walk`, ...):

    python tests/gpu/profile_chunk.py [compiled]

`compiled` profiles `torch.compile(chunk_gla)` as well (its kernels are Inductor's, named by what they fuse).
The chunk chapter's "Speed and memory" quotes an H100 run of the eager table."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import myfla_gla.ops.chunk as chunk
from myfla_gla import bench, chunk_gla

STAGES = ['_chunk_fwd', '_intra_attention', '_walk', '_chunk_bwd', '_intra_grads', '_intra_bwd', '_dg', '_finish_grads']


def labelled(name, f):
    "`f` running inside a profiler range named after it."
    def run(*args, **kwargs):
        with record_function('myfla::' + name):
            return f(*args, **kwargs)
    return run


inp = bench.Inputs(bench.BenchConfig(**bench.PRESETS['gpu1'], device='cuda'))
q, k, v, g = inp.q, inp.k, inp.v, inp.g
do = torch.randn_like(v)
originals = {name: getattr(chunk, name) for name in STAGES}
ops = [('eager', chunk_gla)] + ([('compiled', torch.compile(chunk_gla))] if 'compiled' in sys.argv else [])
for label, op in ops:
    if label == 'eager':   # the compiled op traces the module's own functions, unlabelled
        for name, f in originals.items():
            setattr(chunk, name, labelled(name, f))
    for _ in range(3):
        torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
        torch.cuda.synchronize()
    for name, f in originals.items():
        setattr(chunk, name, f)
    print(f'===== {label}: 5 forward+backward calls', flush=True)
    print(prof.key_averages().table(sort_by='device_time_total', row_limit=50, max_name_column_width=60), flush=True)
