"""The speed leads of the chunk chapter's design notes, at the gpu1 shape (bf16), in one process on one card:

    python tests/gpu/chunk_leads.py [eager] [fla] [compile] [stage] [staged] [lean] [memory] [traffic] [cpu]
                                    [before PATH] [before-compiled PATH] [profile] [passes] [pass-host] [slabs]
                                    [history] [--eager NAMES] [--compiled NAMES] [--rounds N] [--json PATH]

`eager` times `chunk_gla`'s forward and forward+backward (`myfla_gla.bench.time_fn`: median of 20 calls, CUDA events),
peak memory and error against the float64 recurrence for each switchable variant of `myfla_gla.ops.chunk`: the
smallest levels as broadcast products (`_BROADCAST_ROWS`), the forward's chunk states kept for the backward
(`_KEEP_STATES`), products of bf16 operands on tensor cores (`_HALF_PRODUCTS`). `fla` adds FLA's Triton `chunk_gla` (autotuned by its first calls, then timed the same way);
`compile` the `torch.compile`d op for the variants in `COMPILED`; `--eager`/`--compiled` select variants by name (comma-
separated); `--rounds N` times the eager variants N times in turn (the eager op is bound by the host, whose speed
drifts between runs and processes). 'default' is the module's own setting; 'one product' and 'levels' turn the
intra-chunk attention in one product where the chunk's span allows (`_ONE_PRODUCT`) on and off; 'one slab', 'slabs of
16 MiB', 'slabs of 32 MiB' and 'slabs of 64 MiB' set the eager forward's slab budget (`_SLAB_BYTES`; CUDA's default is one slab, 32 MiB is a
quarter of the chunks here), with the levels; 'one product, one slab' and 'one product, slabs of 32 MiB' with the one
product; 'usual forward, ...' and 'lean forward, ...' turn `_chunk_fwd_lean` (`_LEAN_FORWARD`) off and on with the one
product and the named slabs; 'kept states' and 'recomputed states' keep the forward's chunk states for the backward
or not (`_KEEP_STATES`); 'TF32 products' turns `_TF32_PRODUCTS` on; 'compiled passes' and 'eager passes' turn the layout
passes compiled by Inductor (`_COMPILED_PASSES`) on and off, 'compiled passes, forward' on in the forward only (the
backward's eager), 'compiled passes, into chunks' on for the passes into the chunk layout and the products only (those
out of it eager, and the scaled ones); 'compiled passes, forward, slabs of 64 MiB' the forward's with the lean forward in
slabs (its peak memory); a variant that names the slabs takes them for the forward without gradients too. Compiled,
'narrow states' and 'wide states' turn `_NARROW_STATES` on (CUDA's default: the forward without gradients, which `run`
times, stacks its chunk states in bf16) and off. Eager,
'slabs without gradients' sets `_SLAB_BYTES_WITHOUT_GRAD` to 64 MiB (CUDA's default: two slabs at gpu1 for the
forward `run` times; forward+backward stays in one slab) and 'one slab without gradients' takes it off.

`passes` times forms of the layout passes alone (see `passes`); `pass-host` (also without a GPU) the host's cost of
a compiled pass's call and how many the op makes (see `pass_host`). `slabs` compares the eager forward without
gradients in one slab, in the slabs of 'slabs without gradients' (one host check for all slabs) and in the same slabs
with a host check at each slab (as before `_lean_slabs`): time, the CUDA kernels' time and count, and the host's time
to issue a call (see `slabs`); without a GPU, its peak at gpu1 and the host's time at a tiny shape on the CPU
(`slabs_on_cpu`).

`before PATH` times the op of a copy of the package made before a change, imported as `myfla_gla_before` from the
folder PATH (e.g. `git archive REV myfla_gla | tar x -C PATH && mv PATH/myfla_gla PATH/myfla_gla_before`), and this
one, alternately in one process (three rounds of `run`); `before-compiled PATH` the same for the two ops
`torch.compile`d. `profile` prints the CUDA kernels of the eager and the compiled forward and
forward+backward by self time (`torch.profiler`); `history` the blocks live at the compiled forward's peak (the CUDA
allocator's history), each with the line of Inductor's code that allocated it.
`stage` times stage 1 alone (the intra-chunk attention `A` of the forward, and its backward), the dyadic levels
against the one-product form (`_intra_attention` with the switch on: all chunks in one product at normaliser 1, all
flagged and so computed both ways at 0.02) and a two-level scheme of 16-token sub-chunks (`intra_two_level`), eager
and compiled, with the error of `A` against float64 at gate normalisers 1 and 0.02. Also prints the floor
(`myfla_gla.floor`).

`cpu` (no GPU needed) compares the one-product switch on the CPU, one thread: forward and forward+backward of
`chunk_gla`, on and off interleaved in one process, at B=2 T=4096 H=4 K=V=128 and B=1 T=1024 H=4 K=V=128 float32 at
normaliser 1 (every chunk in one product), 0.1 (every chunk flagged) and mixes (one or two heads of four at 0.1); for
the mixes also the flagged chunks' levels by indexing (the op's way) against the levels for all chunks and a `where`.
`--threads N` (default 1).

`lean` compares chunk_gla's eager forward with `_chunk_fwd_lean` (lead 3) off and on (see `lean`).

`staged` measures lead 2, the op's stages compiled with the walks between them eager (see `staged`); without a GPU, at
a small shape on the CPU's CUDA code path.

`memory` (no GPU needed) measures the eager forward's and forward+backward's peak memory on the CUDA code path at the
gpu1 shape on the CPU (the switches' CUDA values set for the CPU, `myfla_gla.bench._cpu_peak_bytes`), with the
one-product stage 1 off and on, the lean forward off and on, in one slab and in slabs (see `memory`).

`traffic` (no GPU needed) counts the kernels and bytes of the eager forward and forward+backward on the CUDA code
path at the gpu1 shape on the CPU for the variants of `--eager` (see `traffic`): where a variant's time goes before a
GPU times it."""
import contextlib
import functools
import json
import re
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import myfla_gla.ops.chunk as chunk
from myfla_gla import bench, chunk_gla, random_gla_inputs
from myfla_gla.floor import floor

results = []

EAGER = {'dyadic levels': dict(rows=0, keep=False, one=False), 'broadcast m<=1': dict(rows=1, keep=False, one=False),
         'broadcast m<=2': dict(rows=2, keep=False, one=False), 'broadcast m<=4': dict(rows=4, keep=False, one=False),
         'broadcast m<=8': dict(rows=8, keep=False, one=False),
         'dyadic levels, kept states': dict(rows=0, keep=True, one=False),
         'broadcast m<=2, kept states': dict(rows=2, keep=True, one=False),
         'broadcast m<=4, kept states': dict(rows=4, keep=True, one=False),
         'dyadic levels (again)': dict(rows=0, keep=False, one=False), 'default': {},
         'float32 products': dict(half=False), 'bf16 products': dict(half=True), 'levels': dict(one=False),
         'one product': dict(one=True), 'one slab': dict(one=False, slab=None),
         'slabs of 16 MiB': dict(one=False, slab=16 << 20), 'slabs of 32 MiB': dict(one=False, slab=32 << 20),
         'one product, one slab': dict(one=True, slab=None), 'one product, slabs of 32 MiB': dict(one=True, slab=32 << 20),
         'slabs of 64 MiB': dict(one=False, slab=64 << 20),
         'usual forward, one slab': dict(one=True, slab=None, lean=False),
         'usual forward, slabs of 64 MiB': dict(one=True, slab=64 << 20, lean=False),
         'lean forward, one slab': dict(one=True, slab=None, lean=True),
         'lean forward, slabs of 64 MiB': dict(one=True, slab=64 << 20, lean=True),
         'lean forward, slabs of 32 MiB': dict(one=True, slab=32 << 20, lean=True),
         'kept states': dict(keep=True), 'recomputed states': dict(keep=False),
         'TF32 products': dict(tf32=True), 'recomputed states, TF32 products': dict(keep=False, tf32=True),
         'compiled passes': dict(passes=True), 'eager passes': dict(passes=False),
         'compiled passes, forward': dict(passes='forward'), 'compiled passes, into chunks': dict(passes='into'),
         'compiled passes, forward, slabs of 64 MiB': dict(passes='forward', one=True, slab=64 << 20, lean=True),
         'slabs without gradients': dict(nograd_slab=64 << 20), 'one slab without gradients': dict(nograd_slab=None)}
for kw in EAGER.values():   # a variant that names the slabs names them for the forward without gradients too
    if 'slab' in kw:
        kw.setdefault('nograd_slab', kw['slab'])
COMPILED = {'dyadic levels': dict(rows=0, keep=False, one=False),
            'broadcast m<=4, kept states': dict(rows=4, keep=True, one=False), 'default': {},
            'float32 products': dict(half=False), 'bf16 products': dict(half=True), 'levels': dict(one=False),
            'one product': dict(one=True), 'narrow states': dict(narrow=True), 'wide states': dict(narrow=False)}
DEFAULT = dict(rows=chunk._BROADCAST_ROWS['cuda'], keep=chunk._KEEP_STATES['cuda'],
               half=chunk._HALF_PRODUCTS['cuda'], one=chunk._ONE_PRODUCT['cuda'], slab=chunk._SLAB_BYTES.get('cuda'),
               lean=chunk._LEAN_FORWARD['cuda'], tf32=chunk._TF32_PRODUCTS.get('cuda', False),
               passes=chunk._COMPILED_PASSES.get('cuda', False), narrow=chunk._NARROW_STATES.get('cuda', False),
               nograd_slab=chunk._SLAB_BYTES_WITHOUT_GRAD.get('cuda'))
if '--compiled' in sys.argv:   # a comma-separated selection of COMPILED
    COMPILED = {k: COMPILED[k] for k in re.split(r',(?! )', sys.argv[sys.argv.index('--compiled') + 1])}
if '--eager' in sys.argv:
    EAGER = {k: EAGER[k] for k in re.split(r',(?! )', sys.argv[sys.argv.index('--eager') + 1])}


_BACKWARD, _COMPILED = chunk._backward, chunk._compiled


def _eager_passes(fn):
    "`fn` with the layout passes eager while it runs (`_COMPILED_PASSES` off, then on again)."
    def run(*args, **kwargs):
        chunk._COMPILED_PASSES['cuda'] = False
        try:
            return fn(*args, **kwargs)
        finally:
            chunk._COMPILED_PASSES['cuda'] = True
    return run


def _into_chunks(compiled):
    "`_compiled` for the unscaled passes into the chunk layout (a float32 destination) and the products only."
    return lambda op, dst, src, scale=None: ((op == 'mul' or scale is None and dst.dtype == torch.float32 != src.dtype)
                                              and compiled(op, dst, src, scale))


def variant(rows=DEFAULT['rows'], keep=DEFAULT['keep'], half=DEFAULT['half'], one=DEFAULT['one'],
            slab=DEFAULT['slab'], lean=DEFAULT['lean'], tf32=DEFAULT['tf32'], passes=DEFAULT['passes'],
            narrow=DEFAULT['narrow'], nograd_slab=DEFAULT['nograd_slab']):
    chunk._BROADCAST_ROWS['cuda'], chunk._KEEP_STATES['cuda'], chunk._HALF_PRODUCTS['cuda'] = rows, keep, half
    chunk._ONE_PRODUCT['cuda'], chunk._LEAN_FORWARD['cuda'], chunk._TF32_PRODUCTS['cuda'] = one, lean, tf32
    chunk._COMPILED_PASSES['cuda'], chunk._NARROW_STATES['cuda'] = bool(passes), narrow
    chunk._backward = _eager_passes(_BACKWARD) if passes == 'forward' else _BACKWARD
    chunk._compiled = _into_chunks(_COMPILED) if passes == 'into' else _COMPILED
    for budgets, budget in ((chunk._SLAB_BYTES, slab), (chunk._SLAB_BYTES_WITHOUT_GRAD, nograd_slab)):
        if budget is None:
            budgets.pop('cuda', None)   # a device type not listed: one slab (without gradients: `_SLAB_BYTES`')
        else:
            budgets['cuda'] = budget


def intra_two_level(q, k, g, S=16):
    """Stage 1 as FLA's kernels do it: `A` `[..., C, C]` from sub-chunks of S tokens. Diagonal sub-blocks elementwise
    (`exp(b_t - b_s)` <= 1 for s <= t); the others as products of `q * exp(b - b_ref)` and `k * exp(b_ref - b)`, with
    `b_ref` the prefix sum before the query sub-chunk (both factors <= 1, so as stable as the dyadic levels)."""
    C, n = q.shape[-2], q.shape[-2] // S
    b = g.cumsum(-2)                                                        # [..., C, K]
    qs, ks, bs = (x.unflatten(-2, (n, S)) for x in (q, k, b))              # [..., n, S, K]
    decay = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).clamp_max_(0).exp_()    # [..., n, S, S, K]
    diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * decay).sum(-1).tril_()   # [..., n, S, S]
    A = q.new_zeros(q.shape[:-1] + (C,))                                    # [..., C, C]
    A.unflatten(-1, (n, S)).unflatten(-3, (n, S)).diagonal(dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
    for i in range(1, n):
        b_ref = b[..., i * S - 1:i * S, :]                                  # [..., 1, K]
        q_decayed = qs[..., i, :, :] * (bs[..., i, :, :] - b_ref).exp()    # [..., S, K]
        k_decayed = k[..., :i * S, :] * (b_ref - b[..., :i * S, :]).exp()  # [..., iS, K]
        A[..., i * S:(i + 1) * S, :i * S] = q_decayed @ k_decayed.transpose(-1, -2)
    return A


def one_product(fn, device):
    "`fn` with the one-product switch on for `device`."
    def on(*args):
        before = chunk._ONE_PRODUCT.get(device)
        chunk._ONE_PRODUCT[device] = True
        try:
            return fn(*args)
        finally:
            chunk._ONE_PRODUCT[device] = before
    return on


def stage_bwd(fn):
    "Stage 1's backward alone: `fn(q, k, g, dA)` on a copy of g and dA (both overwritten)."
    return lambda q, k, g, dA: fn(q, k, g.clone(), dA.clone())


def stage(device):
    """Stage 1 alone, forward (`A`) and backward (dq, dk from dA): the dyadic levels, the one-product form and
    `intra_two_level` (forward only); time (eager, compiled) at normalisers 1 and 0.02, and the error of `A`."""
    shape = (4, 64, 16, 64, 128) if device == 'cuda' else (2, 64, 4, 64, 128)   # [B, NC, H, C, K] of gpu1 / cpu
    ops = {'dyadic levels': (chunk._intra_levels, False), 'one product': (chunk._intra_attention, True),
           'two-level': (intra_two_level, False), 'levels, backward': (stage_bwd(chunk._intra_bwd_levels), False),
           'one product, backward': (stage_bwd(chunk._intra_bwd), True)}
    for norm in (1., 0.02):
        torch.manual_seed(0)
        qc, kc = torch.randn(shape, device=device), torch.randn(shape, device=device)
        gc = torch.nn.functional.logsigmoid(torch.randn(shape, device=device)) / 16 / norm
        dA = torch.randn(shape[:-1] + (shape[-2],), device=device)
        few = (slice(None), slice(0, 4))   # the first 4 chunks of each row, for the float64 reference
        b = gc[few].double().cumsum(-2)
        decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).clamp_max(0).exp()               # [..., C, C, K]
        ref = (qc[few].double().unsqueeze(-2) * kc[few].double().unsqueeze(-3) * decay).sum(-1).tril()
        A = {n: (one_product(f, device) if on else f)(qc, kc, gc) for n, (f, on) in ops.items() if 'backward' not in n}
        errs = {n: bench.get_err_ratio(ref, a[few] if n == 'two-level' else a[0][few]) for n, a in A.items()}
        print(f'stage 1 at normaliser {norm}: error of A', {n: f'{e:.1e}' for n, e in errs.items()}, flush=True)
        for name, (fn, on) in ops.items():
            args = (qc, kc, gc, dA) if 'backward' in name else (qc, kc, gc)
            for mode in ('eager', 'compiled'):
                if mode == 'compiled' and device != 'cuda':
                    continue
                f = fn if mode == 'eager' else torch.compile(fn)
                f = one_product(f, device) if on else f
                t = bench.time_fn(lambda: f(*args), device, repeats=20 if device == 'cuda' else 5, warmup=2)
                print(f"stage 1 {name:22s} normaliser {norm:4} {mode:9s} {t['median_ms']:8.2f} ms "
                      f"(min {t['min_ms']:.2f})", flush=True)


def by_span_where(one, levels, flagged, args):
    "`chunk._by_span` with the levels for all chunks and a `where` (eager), to time against its indexing."
    n = int(flagged.sum())
    if n == 0:
        return one(*args)
    if 4 * n > flagged.numel():
        return levels(*args)
    mask = flagged[..., None, None]
    weak = one(*args[:2], torch.where(mask, 0., args[2]), *args[3:])   # as the op: the flagged chunks' gates zeroed
    return tuple(torch.where(mask, y, x) for x, y in zip(weak, levels(*args)))


def cpu():
    "The one-product switch on the CPU, one thread: interleaved rounds of on and off, forward and forward+backward."
    threads = int(sys.argv[sys.argv.index('--threads') + 1]) if '--threads' in sys.argv else 1
    torch.set_num_threads(threads)
    rounds, default = 5, chunk._ONE_PRODUCT.get('cpu', False)
    for B, T in ((2, 4096), (1, 1024)):
        for gates, strong in (('normaliser 1', []), ('normaliser 0.1', [0, 1, 2, 3]), ('mix 1/4', [1]),
                              ('mix 1/2', [1, 3])):
            torch.manual_seed(0)
            q, k, v, g = random_gla_inputs(B, T, 4, 128, 128)
            g[:, :, strong] *= 10   # heads at normaliser 0.1
            do = torch.randn_like(v)
            xs = [x.requires_grad_() for x in (q, k, v, g)]
            fwd = lambda: chunk_gla(*(x.detach() for x in xs))[0]
            fwd_bwd = lambda: torch.autograd.grad(chunk_gla(*xs)[0], xs, do)
            ways = {'off': dict(one=False), 'on': dict(one=True)}
            if gates.startswith('mix'):
                ways['on, where'] = dict(one=True, where=True)
            times = {w: {'fwd': [], 'fwd+bwd': []} for w in ways}
            for _ in range(rounds):
                for w, kw in ways.items():
                    chunk._ONE_PRODUCT['cpu'] = kw['one']
                    by_span = chunk._by_span
                    if kw.get('where'):
                        chunk._by_span = by_span_where
                    try:
                        for name, f in (('fwd', fwd), ('fwd+bwd', fwd_bwd)):
                            times[w][name].append(bench.time_fn(f, 'cpu', repeats=3, warmup=1)['median_ms'])
                    finally:
                        chunk._by_span = by_span
            chunk._ONE_PRODUCT['cpu'] = default
            med = {w: {n: sorted(t)[len(t) // 2] for n, t in d.items()} for w, d in times.items()}
            print(f'B={B} T={T} H=4 K=V=128 float32, {gates}, {threads} thread(s), median of {rounds} interleaved '
                  'rounds:', flush=True)
            for w in ways:
                ratios = ', '.join(f"{n} {med[w][n]:7.1f} ms ({med[w][n] / med['off'][n]:.2f}x off; rounds "
                                   f"{min(a / b for a, b in zip(times[w][n], times['off'][n])):.2f}-"
                                   f"{max(a / b for a, b in zip(times[w][n], times['off'][n])):.2f}x)" for n in med[w])
                print(f'  {w:10s} {ratios}', flush=True)


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


if 'stage' in sys.argv:   # also on a CPU (eager only there)
    stage('cuda' if torch.cuda.is_available() else 'cpu')
@contextlib.contextmanager
def cuda_path_on_cpu(device='cpu', more=()):
    """Within the block, the op's per-device switches (and the switches `more`) take their CUDA values for `device`;
    restored after (on 'cuda' that is all it does)."""
    switches = (chunk._BROADCAST_ROWS, chunk._HALF_PRODUCTS, chunk._KEEP_STATES, chunk._ONE_PRODUCT, chunk._SLAB_BYTES,
                chunk._LEAN_FORWARD, *more)
    before = [dict(d) for d in switches]
    for d in switches:
        d[device] = d.get('cuda')
    try:
        yield
    finally:
        for d, b in zip(switches, before):
            d.clear()
            d.update(b)


@contextlib.contextmanager
def lean_forward(device, on):
    "Within the block, `_LEAN_FORWARD` is `on` for `device`; restored after."
    before = chunk._LEAN_FORWARD.get(device)
    chunk._LEAN_FORWARD[device] = on
    try:
        yield
    finally:
        chunk._LEAN_FORWARD[device] = before


def lean():
    """Lead 3: chunk_gla's eager forward with `_chunk_fwd_lean` off and on (`_LEAN_FORWARD`; the design notes' first
    figures are of its prototype, measured before it was the op's): the largest relative RMS difference of o and the
    final state (float32, normaliser 16, the CUDA code path on the CPU, one thread), then at gpu1 (bf16) both
    forwards' peak on the CUDA code path, measured on the CPU. With CUDA, also both forwards at gpu1 on the GPU:
    time (median of 20 calls), peak memory and the relative RMS difference of the outputs."""
    torch.manual_seed(0)
    torch.set_num_threads(1)   # no floors on a CPU (`chunk._floor`), as on CUDA
    x = random_gla_inputs(2, 300, 3, 32, 16, gate_logit_normalizer=16)
    h0 = torch.randn(2, 3, 32, 16)
    q, k, v = (torch.randn(4, 4096, 16, 128, dtype=torch.bfloat16) for _ in range(3))
    g = (torch.nn.functional.logsigmoid(torch.randn(4, 4096, 16, 128)) / 16).bfloat16()
    with cuda_path_on_cpu():
        outs = []
        for on in (False, True):
            with lean_forward('cpu', on):
                outs.append(chunk_gla(*x, initial_state=h0, output_final_state=True))
        print('lean against usual forward, float32: largest relative RMS difference of o and the final state',
              f'{max(bench.get_err_ratio(w, y) for w, y in zip(*outs)):.1e}', flush=True)
        for on in (False, True):
            with lean_forward('cpu', on), torch.no_grad():
                print(f"{'lean' if on else 'usual'} forward: peak on the CUDA code path (CPU) "
                      f'{bench._cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0]) / 2**20:.1f} MiB', flush=True)
    if torch.cuda.is_available():
        q, k, v, g = (x.cuda() for x in (q, k, v, g))
        outs = []
        for on in (False, True):
            with lean_forward('cuda', on), torch.no_grad():
                t = bench.time_fn(lambda: chunk_gla(q, k, v, g), 'cuda', repeats=20, warmup=3)
                mib = bench.peak_memory(lambda: chunk_gla(q, k, v, g), 'cuda') / 2**20
                outs.append(chunk_gla(q, k, v, g)[0])
            print(f"{'lean' if on else 'usual'} forward on {torch.cuda.get_device_name()}: {t['median_ms']:.2f} ms, "
                  f'peak {mib:.0f} MiB', flush=True)
        print(f'relative RMS difference of the outputs {bench.get_err_ratio(outs[0].float(), outs[1].float()):.1e}')


def by_span_breaking(one, levels, flagged, args):
    """`chunk._by_span` for `staged_op`: the host check splits the graph (`torch.cond` over symbolic shapes fails to
    trace in torch 2.13: its branches' output strides differ), and the levels take all chunks where any is flagged."""
    return one(*args) if int(flagged.sum()) == 0 else levels(*args)


@contextlib.contextmanager
def staged_op():
    """Within the block, `chunk_gla` runs lead 2's form: the forward's and the backward's stages compiled
    (`torch.compile(dynamic=True)` of `_forward` and `_backward`, so their Inductor switches apply: kept states, bf16
    products) and the state walks eager between them (`_walk` left out of the graphs), so that one compilation serves
    every length and the number of chunks is not unrolled into the graph."""
    saved = chunk._forward, chunk._backward, chunk._walk, chunk._by_span
    torch._dynamo.reset()
    chunk._walk = torch.compiler.disable(chunk._walk)
    chunk._by_span = by_span_breaking
    chunk._forward, chunk._backward = (torch.compile(f, dynamic=True) for f in saved[:2])
    try:
        yield
    finally:
        chunk._forward, chunk._backward, chunk._walk, chunk._by_span = saved
        torch._dynamo.reset()


def staged(device, lengths=(4096, 2048, 8192, 1000)):
    """Lead 2 (compiled stages, eager walks) against the eager op and the whole op compiled, at gpu1's B, H, K, V
    (bf16) on a GPU, or B=1 H=2 K=V=32 float32 on the CPU (the CUDA code path): for each form, at each length in
    turn, the first calls' time (compilation) and the graphs compiled by them, forward and forward+backward times
    (median of 20 calls on CUDA, 5 on the CPU), and the largest relative RMS difference of the output and gradients
    from eager's."""
    cuda = device == 'cuda'
    B, H, K, dtype = (4, 16, 128, torch.bfloat16) if cuda else (1, 2, 32, torch.float32)
    lengths = lengths if cuda else (256, 128, 512, 100)
    forms = {'eager': (contextlib.nullcontext, lambda: chunk_gla),
             'compiled stages': (staged_op, lambda: chunk_gla),
             'whole op compiled': (contextlib.nullcontext, lambda: torch.compile(chunk_gla))}
    inputs, eager = {}, {}
    for T in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, K, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(dtype).requires_grad_()
        inputs[T] = q, k, v, g, torch.randn_like(v)
    with contextlib.nullcontext() if cuda else cuda_path_on_cpu():
        for name, (context, make) in forms.items():
            torch._dynamo.reset()
            with context():
                op = make()
                for T in lengths:
                    q, k, v, g, do = inputs[T]
                    fwd_bwd = lambda: torch.autograd.grad(op(q, k, v, g)[0], (q, k, v, g), do)
                    def fwd():
                        with torch.no_grad():
                            return op(q, k, v, g)[0]
                    torch._dynamo.utils.counters.clear()
                    t0 = time.perf_counter()
                    got = (fwd(), *fwd_bwd())
                    first = time.perf_counter() - t0
                    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
                    times = [bench.time_fn(f, device, repeats=20 if cuda else 5, warmup=2)['median_ms']
                             for f in (fwd, fwd_bwd)]
                    want = eager.setdefault(T, got)
                    diff = max(bench.get_err_ratio(w.double(), x.double()) for w, x in zip(want, got))
                    print(f'{name:18s} T={T:5d} first calls {first:6.1f} s ({graphs:2d} graphs)  fwd {times[0]:7.2f} '
                          f'ms  fwd+bwd {times[1]:7.2f} ms  difference from eager {diff:.1e}', flush=True)


def memory():
    """Peak memory of the eager forward and forward+backward on the CUDA code path, measured on the CPU (gpu1 shape):
    the usual forward with the levels and with the one product, the lean forward (the one product) in one slab, and
    both forwards in slabs of 64 and 32 MiB (two and four)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 4096, 16, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = (torch.nn.functional.logsigmoid(torch.randn(4, 4096, 16, 128)) / 16).bfloat16().requires_grad_()
    forms = [(False, False, None), (True, False, None), (True, True, None), (True, False, 64 << 20),
             (True, True, 64 << 20), (True, False, 32 << 20), (True, True, 32 << 20)]
    with cuda_path_on_cpu():
        for one, lean, slab in forms:
            chunk._ONE_PRODUCT['cpu'], chunk._LEAN_FORWARD['cpu'], chunk._SLAB_BYTES['cpu'] = one, lean, slab
            fwd = bench._cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0]) / 2**20
            both = bench._cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0].sum().backward()) / 2**20
            print(f"CUDA code path on the CPU, {'lean' if lean else 'usual'} forward, one product "
                  f"{'on' if one else 'off'}, {'one slab' if slab is None else f'slabs of {slab >> 20} MiB'}: "
                  f"peak forward {fwd:.1f} MiB, forward+backward {both:.1f} MiB", flush=True)



class _Traffic(TorchDispatchMode):
    """Counts the kernels a block launches (every op that is not a view or a fresh allocation) and the bytes they move
    (each tensor argument read once, each output written once; `copy_` reads its source and writes its target)."""
    FREE = {'view', '_unsafe_view', 'as_strided', 'unbind', 'select', 'slice', 'expand', 'permute', 'transpose', 't',
            'unsqueeze', 'squeeze', 'alias', 'detach', 'split', 'split_with_sizes', 'diagonal', 'unfold', 'narrow',
            '_reshape_alias', 'lift_fresh', 'empty', 'empty_like', 'new_empty', 'empty_strided'}

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = 0, 0

    @staticmethod
    def nbytes(x):
        return sum(t.numel() * t.element_size() for t in tree_leaves(x)
                   if isinstance(t, torch.Tensor))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split('.')[0]
        if name not in self.FREE:
            self.kernels += 1
            self.bytes += (self.nbytes(args[:2]) if name == 'copy_' else
                           self.nbytes((args, kwargs)) + self.nbytes(out))
        return out


def traffic():
    """Kernels launched and bytes moved by the eager forward (no grad) and forward+backward at gpu1 (bf16) for the
    variants of EAGER (or --eager), counted on the CUDA code path on the CPU (one thread, denormals flushed, so no
    decay is floored as on CUDA), and the bytes' time at 3.0 TB/s (an H100's copy rate): a model of the eager time
    where the passes over memory dominate; the kernels' launches come on top."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    q, k, v = (torch.randn(4, 4096, 16, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = (torch.nn.functional.logsigmoid(torch.randn(4, 4096, 16, 128)) / 16).bfloat16().requires_grad_()
    do = torch.randn_like(v)
    def fwd():
        with torch.no_grad():
            chunk_gla(q, k, v, g)
    def fwd_bwd():
        torch.autograd.grad(chunk_gla(q, k, v, g)[0], (q, k, v, g), do)
    for name, kw in EAGER.items():
        variant(**kw)
        counts = []
        with cuda_path_on_cpu():
            for f in (fwd, fwd_bwd):
                with _Traffic() as t:
                    f()
                counts.append(t)
        print(f'{name:45s} ' + '  '.join(f'{w} {t.kernels:4d} kernels {t.bytes / 1e9:6.2f} GB {t.bytes / 3e9:5.2f} ms'
                                         for w, t in zip(('fwd', 'fwd+bwd'), counts)), flush=True)
    variant()


def passes(device):
    """Forms of the layout passes at gpu1 (bf16 inputs, float32 chunk tensors), each timed alone (median of 50 calls,
    CUDA events) and checked bitwise against the op's eager form: into the chunk layout (`_Fixed.to_chunks`), out of it
    (`from_chunks`), and the lean forward's product with a strided view of q (`_Fixed.mul_`). The other forms: the
    rows of the transposed layout moved as whole 8-byte words (a bf16 tensor viewed as int64, four values a word) and
    cast contiguously, in two passes; Inductor's kernel for the same pass compiled for this shape (`static`); and the
    op's compiled pass (`_compiled`, switched on: a graph per shape, its host overhead included), also at other
    lengths, whose first calls show what compiling again costs. Plain contiguous passes of the same sizes give
    the memory's rate. Without CUDA, a small shape on the CPU checks the forms only."""
    B, T, H, D, C = (4, 4096, 16, 128, 64) if device == 'cuda' else (2, 256, 3, 16, 64)
    NC = T // C
    x = torch.randn(B, T, H, D, device=device).bfloat16()
    ch = torch.randn(B, NC, H, C, D, device=device)                       # a float32 chunk tensor
    words = lambda t: t.view(torch.int64)                                  # bf16 [..., D] -> int64 [..., D / 4]
    chunked = lambda t: t.unflatten(1, (-1, C)).transpose(2, 3)            # [B, T, H, *] -> [B, NC, H, C, *], a view
    out, tmp = torch.empty_like(ch), torch.empty(ch.shape, dtype=x.dtype, device=device)
    y = torch.empty_like(x)
    before, min_numel = chunk._COMPILED_PASSES.get(device), chunk._COMPILED_MIN_NUMEL
    chunk._COMPILED_PASSES[device], chunk._COMPILED_MIN_NUMEL = True, 0   # (the CPU's shape is small)

    def op_pass(op, dst, src, scale=None):
        assert chunk._compiled(op, dst, src, scale), 'the compiled pass did not run'
        return dst
    forms = {   # each returns its result: a chunk tensor, or y-shaped for the passes out of the chunk layout
        'to chunks: copy_ with the cast (the op, eager)': lambda: out.copy_(chunked(x)),
        'to chunks: int64 rows, then the cast': lambda: out.copy_(words(tmp).copy_(chunked(words(x))).view(x.dtype)),
        'to chunks: static': torch.compile(lambda: chunked(x).float().contiguous()),
        'to chunks: the op\'s compiled pass': lambda: op_pass('copy', out, chunked(x)),
        'to chunks, scaled: the op\'s compiled pass': lambda: op_pass('copy', out, chunked(x), 1.),
        'out of chunks: copy_ with the cast (the op, eager)': lambda: (chunked(y).copy_(ch), y)[1],
        'out of chunks: the cast, then int64 rows': lambda: (chunked(words(y)).copy_(words(tmp.copy_(ch))), y)[1],
        'out of chunks: static': torch.compile(lambda: ch.transpose(2, 3).reshape(x.shape).bfloat16()),
        'out of chunks: the op\'s compiled pass': lambda: (op_pass('copy', chunked(y), ch), y)[1],
        'mul_ by a strided bf16 view (the op, eager)': lambda: out.copy_(ch).mul_(chunked(x)),
        'mul_ by int64 rows made contiguous': lambda: out.copy_(ch).mul_(words(tmp).copy_(chunked(words(x))).view(x.dtype)),
        'mul_: the op\'s compiled pass': lambda: op_pass('mul', out.copy_(ch), chunked(x)),
        'alone: int64 rows (bf16, to chunks)': lambda: words(tmp).copy_(chunked(words(x))),
        'alone: bf16 rows by copy_ (to chunks)': lambda: tmp.copy_(chunked(x)),
        'alone: float32 copy of the chunk tensor (contiguous)': lambda: out.copy_(ch),
        'alone: bf16 -> float32 cast (contiguous)': lambda: out.view(x.shape).copy_(x),
        'alone: float32 *= bf16 (contiguous)': lambda: out.view(x.shape).mul_(x),
    }
    want = {'to': chunked(x).float(), 'out': ch.transpose(2, 3).reshape(x.shape).bfloat16(), 'mul': ch * chunked(x)}
    for name, fn in forms.items():
        r = fn()
        if not name.startswith('alone'):
            assert torch.equal(r, want[name.split()[0].rstrip('_:')]), name
        if device == 'cuda':
            t = bench.time_fn(fn, device, repeats=50, warmup=3)
            print(f"{name:55s} {t['median_ms'] * 1e3:7.1f} us  (first call {t['first_s']:.1f} s)", flush=True)
            results.append(dict(name=name, ms=t['median_ms'], first_s=t['first_s']))
    print('every form gives the op\'s numbers bitwise', flush=True)
    for T2 in (T // 2, T // 2 + C):   # other lengths: does the op's compiled pass serve them without compiling again?
        x2 = x[:, :T2].contiguous()
        out2 = out.view(-1)[:x2.numel()].view(B, T2 // C, H, C, D)
        t0 = time.perf_counter()
        op_pass('copy', out2, chunked(x2))
        torch.cuda.synchronize() if device == 'cuda' else None
        assert torch.equal(out2, chunked(x2).float())
        print(f"to chunks, the op's compiled pass, first call at T={T2}: {time.perf_counter() - t0:.2f} s", flush=True)
    chunk._COMPILED_PASSES[device], chunk._COMPILED_MIN_NUMEL = before, min_numel


def profile():
    """The GPU kernels of the eager forward, the eager forward+backward, the compiled forward and the compiled
    forward+backward (module defaults; the forwards without autograd, as `run` times them), five calls each after three
    warm-up calls, by self CUDA time (torch.profiler); with `--shapes` also by operand shapes."""
    shapes = '--shapes' in sys.argv
    from torch.profiler import ProfilerActivity
    compiled = torch.compile(chunk_gla)
    calls = {'eager forward': lambda: chunk_gla(q, k, v, g),
             'eager forward+backward': lambda: torch.autograd.grad(chunk_gla(q, k, v, g)[0], (q, k, v, g), do),
             'compiled forward': lambda: compiled(q, k, v, g),
             'compiled forward+backward': lambda: torch.autograd.grad(compiled(q, k, v, g)[0], (q, k, v, g), do)}
    for name, f in calls.items():
        with torch.no_grad() if name.endswith('forward') else contextlib.nullcontext():
            for _ in range(3):
                f()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                        record_shapes=shapes) as prof:
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
        print(f'--- {name}, 5 calls', flush=True)
        print(prof.key_averages().table(sort_by='self_device_time_total', row_limit=30, max_name_column_width=70),
              flush=True)
        if shapes:   # the products by their operands' shapes, with the time of the kernels they launched
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by='device_time_total', row_limit=40, max_name_column_width=40, max_shapes_column_width=90),
                flush=True)


def slabs():
    """The eager forward without gradients (module defaults otherwise) in one slab, in slabs of 64 MiB with one host
    check for all (`_lean_slabs`) and with a check at each slab: the median time of a call, its CUDA kernels' time and
    count (torch.profiler, five calls), and the time the host takes to issue one (five calls, then a synchronisation).
    Where the kernels' time is the same, a call that takes longer spends it waiting: the device for the host's
    launches after each check that waits for the device. Two rounds."""
    from torch.profiler import ProfilerActivity
    lean_slabs = chunk._lean_slabs

    def per_slab(g, grid, n, fused, prod):   # each slab's check when it comes, from g where it lies (no part chunk)
        C = grid.C
        for tokens, _, _ in chunk._slabs(grid, n):
            gs = g[:, tokens].unflatten(1, (-1, C)).transpose(2, 3)
            yield chunk._lean_allowed(g, fused, prod) and not bool(chunk._flagged(gs, torch.float32).any())

    def fwd():
        with torch.no_grad():
            return chunk_gla(q, k, v, g)[0]
    forms = {'one slab': (None, lean_slabs), 'slabs of 64 MiB, one check': (64 << 20, lean_slabs),
             'slabs of 64 MiB, a check per slab': (64 << 20, per_slab)}
    for r in range(2):
        for name, (budget, check) in forms.items():
            variant(nograd_slab=budget)
            chunk._lean_slabs = check
            t = bench.time_fn(fwd, 'cuda', repeats=20, warmup=3)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                fwd()
            host = (time.perf_counter() - start) / 5 * 1e3
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            print(f"{name:36s} round {r + 1}: {t['median_ms']:.3f} ms a call, kernels "
                  f"{sum(e.self_device_time_total for e in kernels) / 5e3:.3f} ms in "
                  f"{sum(e.count for e in kernels) / 5:.0f}, host {host:.3f} ms to issue a call", flush=True)
    chunk._lean_slabs = lean_slabs
    variant()


def history():
    """The blocks live at the peak of one compiled inference forward (`no_grad`, as the bench measures its peak), from
    the CUDA caching allocator's history after three warm-up calls: size, the line of Inductor's generated code that
    allocated it and the op's frame it came from."""
    compiled = torch.compile(chunk_gla)
    with torch.no_grad():
        for _ in range(3):
            compiled(q, k, v, g)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=100000, stacks='python')
        out = compiled(q, k, v, g)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    print(f'compiled forward: peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above its inputs',
          flush=True)
    live, cur, peak, at_peak = {}, 0, 0, {}
    for ev in snap['device_traces'][0]:   # replayed: the live blocks where the most bytes were live
        if ev['action'] == 'alloc':
            frames = [f for f in ev.get('frames', []) if 'torch/' not in f['filename']]   # generated code, the op
            live[ev['addr']] = (ev['size'], frames[:2])
            cur += ev['size']
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev['action'] == 'free_requested' and ev['addr'] in live:
            cur -= live.pop(ev['addr'])[0]
    print(f'replayed: {peak / 2**20:.0f} MiB allocated within the call at its peak', flush=True)
    for size, frames in sorted(at_peak.values(), key=lambda x: -x[0]):
        where = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames]
        code = ''
        if frames:
            try:
                code = open(frames[0]['filename']).read().splitlines()[frames[0]['line'] - 1].strip()
            except (OSError, IndexError):
                pass
        print(f'{size / 2**20:8.1f} MiB  {"; ".join(where)}\n            {code}', flush=True)
    del out


def tiny_slabs(n):
    "The slab budget that splits the 64 chunks of B=1 T=4096 H=1 K=V=16 into `n` slabs (None: one)."
    return 64 * 64 * 16 * 4 // n if n > 1 else None


def slabs_on_cpu():
    """`slabs` without a GPU, on the CPU's CUDA code path (one thread, denormals flushed: no floors, as on CUDA): the
    forward without gradients' peak memory at gpu1 (`bench._cpu_peak_bytes`) in one slab and in the slabs of 'slabs
    without gradients', and the host's time of a call (fastest of 30 after 5) at a shape too small for the arithmetic to
    count (B=1 T=4096 H=1 K=V=16 bf16: gpu1's 64 chunks) in one, two and four slabs, three rounds."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    def inputs(B, T, H, K):
        g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)) / 16).bfloat16()
        return *(torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3)), g
    with cuda_path_on_cpu(more=(chunk._SLAB_BYTES_WITHOUT_GRAD,)), torch.no_grad():
        x = inputs(4, 4096, 16, 128)
        for budget in (None, 64 << 20):
            chunk._SLAB_BYTES_WITHOUT_GRAD['cpu'] = budget
            print(f"forward without gradients at gpu1, {'one slab' if budget is None else 'slabs of 64 MiB'}: peak "
                  f"{bench._cpu_peak_bytes(lambda: chunk_gla(*x)[0]) / 2**20:.1f} MiB", flush=True)
        x = inputs(1, 4096, 1, 16)
        for r in range(3):
            times = {}
            for n in (1, 2, 4):
                chunk._SLAB_BYTES_WITHOUT_GRAD['cpu'] = tiny_slabs(n)
                for _ in range(5):
                    chunk_gla(*x)
                ts = []
                for _ in range(30):
                    start = time.perf_counter()
                    chunk_gla(*x)
                    ts.append(time.perf_counter() - start)
                times[n] = min(ts) * 1e3
            print(f'round {r + 1}, host time of a call: ' + ', '.join(f"{t:.2f} ms in {n} slab{'s' * (n > 1)}"
                                                                      for n, t in times.items()), flush=True)


def pass_host():
    """The host's cost of a layout pass compiled by Inductor (`_compiled`), on the GPU where there is one, else on the
    CPU: microseconds a call (fastest of five rounds of 2000 calls, no synchronisation inside a round) of a copy of
    gpu1's g into a slab of chunk layout at B=1 T=4096 H=1 K=16 (64 chunks, 65536 elements: small enough that only the
    host counts) as the eager copy, as `_compiled` (the op's path: its lookup of the pass's `standalone_compile`
    artifact), as the pass `torch.compile`d, called directly (Dynamo's frame and guards), and as the artifact called
    directly. Then how many compiled passes the op's eager forward without gradients (one and two slabs) and
    forward+backward run at that shape with CUDA's switches, and the host's time of each call (fastest of five rounds
    of 20 calls)."""
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.set_num_threads(1)
    more = (chunk._NARROW_STATES, chunk._COMPILED_PASSES, chunk._SLAB_BYTES_WITHOUT_GRAD)
    min_numel = chunk._COMPILED_MIN_NUMEL
    with cuda_path_on_cpu(device, more):
        chunk._COMPILED_MIN_NUMEL = 1
        try:
            _pass_host(device)
        finally:
            chunk._COMPILED_MIN_NUMEL = min_numel


def _pass_host(device):
    from torch.fx.experimental.proxy_tensor import make_fx
    src = torch.randn(1, 4096, 1, 16, dtype=torch.bfloat16, device=device).unflatten(1, (64, 64)).transpose(2, 3)
    dst = torch.empty(1, 64, 1, 64, 16, device=device)

    def host_us(fn, calls=2000):
        for _ in range(20):
            fn()
        best = float('inf')
        for _ in range(5):
            if device == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls)
        return best * 1e6

    graph = make_fx(lambda *xs: chunk._pass_body('copy')(*xs))(dst, src)
    art = torch._inductor.standalone_compile(graph, [dst, src], dynamic_shapes='from_example_inputs')
    forms = {'eager copy': lambda: dst.copy_(src), '_compiled': lambda: chunk._compiled('copy', dst, src),
             'torch.compile, called directly': functools.partial(
                 torch.compile(chunk._pass_body('copy'), dynamic=False, fullgraph=True), dst, src, None),
             'standalone_compile, called directly': functools.partial(art, dst, src)}
    for name, fn in forms.items():
        dst.zero_()
        fn()
        exact = torch.equal(dst, src.float())
        print(f"{name:36s} {host_us(fn):6.1f} us a call on {device}, the copy {'exact' if exact else 'WRONG'}",
              flush=True)
    x = [torch.randn(1, 4096, 1, 16, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(3)]
    g1 = (torch.nn.functional.logsigmoid(torch.randn(1, 4096, 1, 16, device=device)) / 16).bfloat16().requires_grad_()
    ran, compiled = [], chunk._compiled
    chunk._compiled = lambda *a: compiled(*a) and (ran.append(a[0]) or True)
    try:
        for n in (1, 2):
            chunk._SLAB_BYTES_WITHOUT_GRAD[device] = tiny_slabs(n)
            with torch.no_grad():
                chunk_gla(*x, g1)
                ran.clear()
                chunk_gla(*x, g1)
            print(f'forward without gradients in {n} slab(s): {len(ran)} compiled passes', flush=True)
        chunk_gla(*x, g1)[0].sum().backward()
        ran.clear()
        chunk_gla(*x, g1)[0].sum().backward()
        print(f'forward+backward: {len(ran)} compiled passes', flush=True)
        chunk._compiled, fwd = compiled, lambda: chunk_gla(*x, g1)
        times = []
        for n, fn in ((1, fwd), (2, fwd), (0, lambda: fwd()[0].sum().backward())):   # n slabs; 0: with gradients
            chunk._SLAB_BYTES_WITHOUT_GRAD[device] = tiny_slabs(n)
            with torch.set_grad_enabled(n == 0):
                times.append(host_us(fn, 20) / 1e3)
        print(f'the op: forward without gradients {times[0]:.2f} ms in one slab, {times[1]:.2f} in two, '
              f'forward+backward {times[2]:.2f} ms', flush=True)
    finally:
        chunk._compiled = compiled


if 'memory' in sys.argv:
    memory()
if 'slabs' in sys.argv and not torch.cuda.is_available():
    slabs_on_cpu()
if 'pass-host' in sys.argv:
    pass_host()
if 'passes' in sys.argv:
    passes('cuda' if torch.cuda.is_available() else 'cpu')
if 'traffic' in sys.argv:
    traffic()
if 'lean' in sys.argv:
    lean()
if 'cpu' in sys.argv:
    cpu()
if 'staged' in sys.argv:
    staged('cuda' if torch.cuda.is_available() else 'cpu')
if not {'eager', 'fla', 'compile', 'before', 'before-compiled', 'profile', 'history'} & set(sys.argv) and not (
        'slabs' in sys.argv and torch.cuda.is_available()):
    sys.exit()
inp = bench.Inputs(bench.BenchConfig(**bench.PRESETS['gpu1'], device='cuda'))
q, k, v, g = inp.q, inp.k, inp.v, inp.g
do = torch.randn_like(v)
fl = floor(4, 4096, 16, 128, 128, torch.bfloat16, 'cuda')
print('floor', json.dumps(fl), flush=True)
results.append(dict(name='floor', **fl))
if 'eager' in sys.argv:
    ROUNDS = int(sys.argv[sys.argv.index('--rounds') + 1]) if '--rounds' in sys.argv else 1
    for i in range(ROUNDS):   # the variants in turn, round after round: a drift of the host's speed meets them all
        for name, kw in EAGER.items():
            variant(**kw)
            run(name if ROUNDS == 1 else f'{name}, round {i + 1}', chunk_gla)
    variant()
for mode in ('before', 'before-compiled'):   # `before PATH`: the op of the package copy `PATH/myfla_gla_before`
    if mode not in sys.argv:                 # against this one; `before-compiled PATH` the two compiled
        continue
    sys.path.insert(0, sys.argv[sys.argv.index(mode) + 1])
    import myfla_gla_before
    ops = myfla_gla_before.chunk_gla, chunk_gla
    if mode == 'before-compiled':
        ops = tuple(torch.compile(op) for op in ops)
    for i in range(3):
        run(f'{mode}, round {i + 1}', ops[0])
        run(f"now{', compiled' if mode != 'before' else ''}, round {i + 1}", ops[1])
if 'profile' in sys.argv:
    profile()
if 'slabs' in sys.argv:
    slabs()
if 'history' in sys.argv:
    history()
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
        variant(rows=0, keep=False, half=False, one=False)
        want = torch.autograd.grad(chunk_gla(q, k, v, g)[0], (q, k, v, g), do)
        print('  gradients against eager dyadic levels with float32 products, largest relative RMS difference:',
              f"{max(bench.get_err_ratio(w.double(), x.double()) for w, x in zip(want, got)):.1e}", flush=True)
    variant()
if '--json' in sys.argv:
    with open(sys.argv[sys.argv.index('--json') + 1], 'w') as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=' '.join(sys.argv),
                       results=results), f, indent=1)
