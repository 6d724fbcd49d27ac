"""Benchmark chunk_gla on CUDA against FLA's Triton chunk_gla: forward and forward+backward time (CUDA events,
warm-up, median) and forward+backward peak memory, eager and torch.compile'd, plus fused_chunk_gla.

    python tests/gpu/bench_chunk.py                      # the two reference shapes, bf16
    python tests/gpu/bench_chunk.py --shapes 4,4096,16,128,128 --dtype float16 --no-compile

Peak memory is torch.cuda.max_memory_allocated() during one forward+backward, minus what was allocated before
(the inputs and their gradients' storage are counted once, the same for every row). Ratios are against FLA in the
same process on the same card; "o vs first" is the output's relative error against the first row's (FLA's).
The first call of each implementation compiles (torch.compile: a minute or two) or autotunes (FLA's Triton
kernels: also minutes on a fresh machine); rows are printed as they finish. Not a test: nothing is asserted."""
import argparse
import statistics

import torch

from myfla_gla import chunk_gla, fused_chunk_gla, get_err_ratio, random_gla_inputs


def cuda_time(fn, warmup=3, rep=10):
    "Median milliseconds of `fn()` with CUDA events."
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def bench_shape(B, T, H, K, V, dtype, compile_, rep):
    q, k, v, g = random_gla_inputs(B, T, H, K, V, dtype=dtype, device='cuda', requires_grad=True)
    do = torch.randn(B, T, H, V, device='cuda', dtype=dtype)
    impls = {}
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
        impls['FLA chunk_gla (Triton)'] = fla_chunk_gla
    except ImportError:
        print('FLA not importable: no FLA row')
    impls.update({'chunk_gla (eager)': chunk_gla, 'fused_chunk_gla (eager)': fused_chunk_gla})
    if compile_:
        impls['chunk_gla (compiled)'] = torch.compile(chunk_gla, fullgraph=True)
    print(f'\nB={B} T={T} H={H} K={K} V={V} {str(dtype)[6:]} on {torch.cuda.get_device_name()}', flush=True)
    print(f"{'implementation':26}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GiB':>10}{'o vs first':>12}", flush=True)
    rows, first = {}, None
    for name, fn in impls.items():
        def fwd():
            return fn(q, k, v, g)[0]

        def fwd_bwd():
            fn(q, k, v, g)[0].backward(do)

        fwd_bwd()                                  # compiles (ours) or autotunes (FLA) on the first call
        o = fwd().detach().float()
        first = o if first is None else first
        q.grad = k.grad = v.grad = g.grad = None
        rows[name] = (cuda_time(fwd, rep=rep), cuda_time(fwd_bwd, rep=rep), peak_gib(fwd_bwd))
        q.grad = k.grad = v.grad = g.grad = None
        print(f'{name:26}{rows[name][0]:9.2f}{rows[name][1]:12.2f}{rows[name][2]:10.2f}'
              f'{get_err_ratio(first, o):12.1e}', flush=True)
    fla = rows.get('FLA chunk_gla (Triton)')
    if fla:
        print(f"{'ratio to FLA':26}{'fwd':>9}{'fwd+bwd':>12}{'peak':>10}")
        for name, (tf, tfb, mem) in rows.items():
            print(f'{name:26}{tf / fla[0]:9.2f}{tfb / fla[1]:12.2f}{mem / fla[2]:10.2f}', flush=True)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shapes', nargs='*', default=['4,4096,16,128,128', '8,2048,4,256,512'],
                   help='B,T,H,K,V for each shape')
    p.add_argument('--dtype', default='bfloat16')
    p.add_argument('--no-compile', dest='compile_', action='store_false')
    p.add_argument('--rep', type=int, default=10)
    args = p.parse_args()
    for s in args.shapes:
        bench_shape(*map(int, s.split(',')), getattr(torch, args.dtype), args.compile_, args.rep)
