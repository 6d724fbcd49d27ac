"""Benchmark chunk_gla on CUDA against FLA's Triton chunk_gla: forward and forward+backward time (CUDA events,
warm-up, median) and forward+backward peak memory, eager and torch.compile'd, plus fused_chunk_gla.

    python tests/gpu/bench_chunk.py                      # the two reference shapes, bf16
    python tests/gpu/bench_chunk.py --shapes 4,4096,16,128,128 --dtype float16 --no-compile

Peak memory is torch.cuda.max_memory_allocated() during one forward+backward, minus what was allocated before
(the inputs), so it counts what the op itself needs. Ratios are against FLA in the same process on the same card.
Not a test: nothing here is asserted."""
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
    impls = {'chunk_gla (eager)': chunk_gla, 'fused_chunk_gla (eager)': fused_chunk_gla}
    if compile_:
        impls['chunk_gla (compiled)'] = torch.compile(chunk_gla, fullgraph=True)
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
        impls['FLA chunk_gla (Triton)'] = fla_chunk_gla
    except ImportError:
        print('FLA not importable: no FLA row')
    rows, outs = {}, {}
    for name, fn in impls.items():
        def fwd():
            return fn(q, k, v, g)[0]

        def fwd_bwd():
            fn(q, k, v, g)[0].backward(do)

        fwd_bwd()                                  # compiles where needed
        outs[name] = fwd().detach().float()
        q.grad = k.grad = v.grad = g.grad = None
        rows[name] = (cuda_time(fwd, rep=rep), cuda_time(fwd_bwd, rep=rep), peak_gib(fwd_bwd))
        q.grad = k.grad = v.grad = g.grad = None
    fla = rows.get('FLA chunk_gla (Triton)')
    print(f'\nB={B} T={T} H={H} K={K} V={V} {str(dtype)[6:]} on {torch.cuda.get_device_name()}')
    print(f"{'implementation':26}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GiB':>10}"
          + (f"{'fwd x':>8}{'fwd+bwd x':>11}{'peak x':>8}{'o vs FLA':>10}" if fla else ''))
    for name, (tf, tfb, mem) in rows.items():
        line = f'{name:26}{tf:9.2f}{tfb:12.2f}{mem:10.2f}'
        if fla:
            line += (f'{tf / fla[0]:8.2f}{tfb / fla[1]:11.2f}{mem / fla[2]:8.2f}'
                     f'{get_err_ratio(outs["FLA chunk_gla (Triton)"], outs[name]):10.1e}')
        print(line)


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
