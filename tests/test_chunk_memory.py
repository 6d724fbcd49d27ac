"""The eager op's memory (`_forward`'s and `_backward`'s slabs of chunks): the forward's peak in slabs with the CUDA
code path's other switches, measured on the CPU at a shape scaled down from the GPU benchmark's, against a budget of its
tensors, and the forward+backward's against one pass; slabs of any size give the numbers of one pass, outputs and
gradients, bitwise."""
import pytest
import torch

import myfla_gla.ops.chunk as chunk
from myfla_gla import DEFAULT_RATIO, assert_close, chunk_gla, fused_chunk_gla
from myfla_gla.bench import _cpu_peak_bytes
from myfla_gla.testing import op_inputs, run_op, run_reference
from helpers import host_reads, threads
from test_chunk import NAMES, check


def scaled_gpu1(B, T, H, K, V):
    "bf16 inputs requiring gradients as the gpu1 benchmark's (gates at normaliser 16), at a shape scaled down."
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.bfloat16, requires_grad=True) for D in (K, K, V))
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)) / 16).bfloat16().requires_grad_()
    return q, k, v, g


@pytest.mark.parametrize('one_product', [False, True])
def test_forward_peak_in_slabs(monkeypatch, one_product):
    """The gpu1 benchmark's shape (B=4 T=4096 H=16 K=V=128, bf16, 64 chunks) scaled to B=1 T=1024 H=4: 16 chunks, and
    a budget of 32 MiB at gpu1 (a quarter of the chunks, 16 of 64; CUDA's default is one slab, see the chunk
    chapter's design notes) scaled to a quarter of the chunks here. The forward's peak
    (grad enabled, the output included) is what stays until the end, the output and A, plus one slab's working set
    at stage 2: its float32 chunk copies of q, k, v and g, `decay_k`, A v, A and the local states, plus the carried
    state and the walk's two (its spare slot and its result), and the initial states of the slabs before (kept for the
    backward). Another float32 tensor of one slab's chunks (a quarter of the 2 MiB a float32 copy of q takes here)
    breaks the bound; the forward before slabs peaked at 17.5 MiB here. Both stage 1 forms (one product,
    the levels) stay within it. The bound is also within 1.5x FLA's forward: its output, g's cumulative sum (float32),
    A and the chunk states (bf16)."""
    for switch in ('_BROADCAST_ROWS', '_HALF_PRODUCTS', '_KEEP_STATES'):
        monkeypatch.setitem(getattr(chunk, switch), 'cpu', getattr(chunk, switch).get('cuda'))
    monkeypatch.setitem(chunk._ONE_PRODUCT, 'cpu', one_product)
    B, T, H, K, V, C = 1, 1024, 4, 128, 128, 64
    n = 4   # chunks per slab
    monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', (32 << 20) * (B * H * n) // (4 * 16 * 16))
    q, k, v, g = scaled_gpu1(B, T, H, K, V)
    assert chunk._slab_chunks(q, v, chunk._Fixed(B, T, C)) == n
    peak = _cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0])
    f32 = 4
    out, A = B * T * H * V * 2, B * T * H * C * f32
    copy, state = B * n * H * C * max(K, V) * f32, B * H * K * V * f32    # a slab's float32 chunk copy; one state
    slab = 6 * copy + n * B * H * C * C * f32 + n * state                 # 4 copies, decay_k, A v; A; local states
    small = 16 << 10                                                      # [B, n, H, K] decay factors of chunk ends
    starts = (T // C // n - 1) * state                                    # the slabs' initial states but the first
    assert peak <= out + A + slab + 3 * state + starts + small, peak
    fla = out + B * T * H * K * f32 + A + B * (T // C) * H * K * V * 2
    assert peak <= 1.5 * fla, (peak, fla)


@pytest.fixture
def lean_calls(monkeypatch):
    "The op's switches at their CUDA values for the CPU (the lean forward among them); the list of its calls."
    for switch in ('_BROADCAST_ROWS', '_HALF_PRODUCTS', '_KEEP_STATES', '_ONE_PRODUCT', '_LEAN_FORWARD'):
        monkeypatch.setitem(getattr(chunk, switch), 'cpu', getattr(chunk, switch).get('cuda'))
    calls = []
    monkeypatch.setattr(chunk, '_chunk_fwd_lean', lambda *a, fn=chunk._chunk_fwd_lean: calls.append(1) or fn(*a))
    return calls


@pytest.mark.parametrize('n', [16, 8, 4])
def test_lean_forward_peak(monkeypatch, lean_calls, n):
    """CUDA's forward (`_chunk_fwd_lean`, the other switches at their CUDA values) at the scaled gpu1 shape of
    `test_forward_peak_in_slabs` (B=1 T=1024 H=4 K=V=128, bf16, 16 chunks), in one pass (CUDA's default) and in slabs
    of 8 and 4 chunks: the peak, at a slab's stage 2, is g's chunk copy become q * decay_q, k * decay_k, v's float32
    copy, A and the local states of the slab, with the output, A of all chunks and the slabs' initial states. The
    usual forward, which keeps the copies of q, k, v and g, `decay_k` and A v besides, peaked at 17.5 MiB here in one
    pass (at gpu1, measured the same way: 1098 MiB, 685 in two slabs, 420.5 in four, against 772, 488 and 320 with
    this one; FLA's is 384). Another float32 chunk copy of a slab breaks the bound.
    Slabs give the numbers of one pass, bitwise."""
    B, T, H, K, V, C, f32 = 1, 1024, 4, 128, 128, 64, 4
    q, k, v, g = scaled_gpu1(B, T, H, K, V)
    with threads(1):   # no floors on a CPU (see `_floor`), as on CUDA
        monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', None)
        one_pass = chunk_gla(q, k, v, g)[0]
        monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', B * n * H * C * max(K, V) * f32)
        assert chunk._slab_chunks(q, v, chunk._Fixed(B, T, C)) == n
        lean_calls.clear()
        peak = _cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0])
        assert torch.equal(chunk_gla(q, k, v, g)[0], one_pass)
    assert len(lean_calls) == 2 * (T // C // n)   # two calls, each slab through it
    out, A, copy = B * T * H * V * 2, B * T * H * C * f32, B * n * H * C * max(K, V) * f32
    state, small = B * H * K * V * f32, 16 << 10
    slab = 3 * copy + n * B * H * C * C * f32 + n * state    # q * decay_q, k * decay_k, v; A; the local states
    starts = (T // C // n - 1) * state
    assert peak <= out + A + slab + 2 * state + starts + small, peak   # the carried state, the walk's spare slot


@pytest.mark.parametrize('T', [1024, 1000])
def test_forward_without_gradients_in_slabs(monkeypatch, lean_calls, T):
    """A forward that no backward will follow takes the slabs of `_SLAB_BYTES_WITHOUT_GRAD` while one with gradients
    takes `_SLAB_BYTES`' one pass (CUDA's other switches, one CPU thread; the scaled gpu1 shape of
    `test_forward_peak_in_slabs`, slabs of 4 chunks, with T=1000 the last chunk partial): the output bitwise that of
    one pass, every slab through `_chunk_fwd_lean`, which the slabs choose with as many host reads as one pass makes
    (one check for all slabs: a GPU would otherwise wait at each), and a peak without A of all chunks or the slabs'
    initial states: the output and one slab's working set (`test_lean_forward_peak`'s; at gpu1, measured the same
    way, 424 MiB in slabs of 64 MiB against 773 in one: 1.1x FLA's forward)."""
    B, H, K, V, C, f32, n = 1, 4, 128, 128, 64, 4, 4
    q, k, v, g = scaled_gpu1(B, T, H, K, V)
    grid, copy = chunk._Fixed(B, T, C), B * n * H * C * max(K, V) * f32    # a slab's float32 chunk copy
    monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', None)
    monkeypatch.setitem(chunk._SLAB_BYTES_WITHOUT_GRAD, 'cpu', copy)
    assert chunk._slab_chunks(q, v, grid, grad=False) == n and chunk._slab_chunks(q, v, grid) == grid.NC
    with threads(1):   # no floors on a CPU (see `_floor`), as on CUDA
        one_pass, reads = chunk_gla(q, k, v, g)[0], host_reads(lambda: chunk_gla(q, k, v, g))
        assert len(lean_calls) == 2
        lean_calls.clear()
        with torch.no_grad():
            assert torch.equal(chunk_gla(q, k, v, g)[0], one_pass)
            assert len(lean_calls) == -(-grid.NC // n)
            assert host_reads(lambda: chunk_gla(q, k, v, g)) == reads
            peak = _cpu_peak_bytes(lambda: chunk_gla(q, k, v, g)[0])
    out, state, rows = B * T * H * V * 2, B * H * K * V * f32, B * n * H * K * f32
    slab = 3 * copy + n * B * H * C * C * f32 + n * state    # q * decay_q, k * decay_k, v; A; the local states
    assert peak <= out + slab + 2 * state + 3 * rows, peak  # the carried state, the walk's spare slot; r, g_0, decay


@pytest.mark.parametrize('per_slab, flagged, lean', [(1, 1, 3), (1, 3, 3), (3, 1, 1), (3, 3, 1)])
def test_slabs_choose_the_lean_forward_each(monkeypatch, lean_calls, per_slab, flagged, lean):
    """In slabs of one chunk and of three (B=2 T=200 H=2 K=16 V=8 float32, CUDA's switches, one CPU thread: four chunks
    of 64, the last partial), one chunk of one head and channel with gates strong enough to flag it (`_flagged`): the
    second, or the fourth (8 tokens). Its slab takes the usual forward and the others `_chunk_fwd_lean`, chosen by
    the one check for all slabs (`_lean_slabs`); output and final state against the float64 recurrence, without
    gradients and with them."""
    x = op_inputs('cpu', torch.float32, 2, 200, 2, 16, 8, seed=0, dht=False)
    x['g'][1, 64 * flagged:64 * flagged + 64, 0, 3] = -20.   # its sum after the first token below -80 (span 40)
    grid = chunk._Fixed(2, 200, 64)
    assert chunk._flagged(grid.to_chunks(x['g'], torch.float32)).any((0, 2)).tolist() == [c == flagged for c in range(4)]
    for budgets in (chunk._SLAB_BYTES, chunk._SLAB_BYTES_WITHOUT_GRAD):   # with gradients and without
        monkeypatch.setitem(budgets, 'cpu', per_slab * 2 * 2 * 64 * 16 * 4)
    ref = run_reference(x)
    with threads(1):
        for grad in (False, True):
            lean_calls.clear()
            with torch.set_grad_enabled(grad):
                o, ht = chunk_gla(x['q'], x['k'], x['v'], x['g'], initial_state=x['h0'], output_final_state=True)
            assert len(lean_calls) == lean, lean_calls
            assert_close('o', ref['o'], o, DEFAULT_RATIO[torch.float32])
            assert_close('ht', ref['ht'], ht, DEFAULT_RATIO[torch.float32])


@pytest.mark.parametrize('dtype, T, keep', [(torch.float32, 200, False), (torch.bfloat16, 200, False),
                                           (torch.float32, 256, True), (torch.float64, 256, False)])
@pytest.mark.parametrize('per_slab', [1, 3])
def test_slabs_give_the_numbers_of_one_pass(monkeypatch, dtype, T, keep, per_slab):
    """Slabs of 1 and 3 chunks (a made-up CPU budget) over 4 chunks, the last partial (T=200) or whole (T=256), with an
    initial state and a final state's gradient, and with the chunk states kept for the backward (`_KEEP_STATES`: in
    one pass; slabs recompute them): every output and gradient of both ops bitwise those of one pass, the backward run
    slab by slab too (its chunk backward called once per slab), and within the bounds against the float64 recurrence."""
    monkeypatch.setitem(chunk._KEEP_STATES, 'cpu', keep)
    calls = {}
    for name in ('_chunk_bwd', '_fused_bwd'):   # counted: `_backward` looks them up at each call
        def counted(*args, name=name, fn=getattr(chunk, name), **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kw)
        monkeypatch.setattr(chunk, name, counted)
    x = op_inputs('cpu', dtype, 2, T, 2, 16, 8, seed=None)
    monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', None)
    one_pass = {fn: run_op(fn, x) for fn in (chunk_gla, fused_chunk_gla)}
    assert calls == {'_chunk_bwd': 1, '_fused_bwd': 1}, calls
    acc = torch.promote_types(dtype, torch.float32)
    monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', per_slab * 2 * 2 * 64 * 16 * acc.itemsize)
    assert chunk._slab_chunks(x['q'], x['v'], chunk._Fixed(2, T, 64)) == per_slab
    calls.clear()
    for fn, ref in one_pass.items():
        got = run_op(fn, x)
        for name in NAMES:
            assert torch.equal(got[name], ref[name]), (fn.__name__, name)
    slabs = -(-4 // per_slab)
    assert calls == {'_chunk_bwd': slabs, '_fused_bwd': slabs}, calls
    check(2, T, 2, 16, 8, dtype, ratio=1e-12 if dtype == torch.float64 else None)


def test_forward_backward_peak_in_slabs(monkeypatch):
    """The forward+backward's peak (the CPU's switches, bf16, B=1 T=1024 H=4 K=V=128: 16 chunks, slabs of 4) is what
    stays for the whole problem, the output, A (float32), the four input gradients and the slabs' initial states, plus
    the backward's working set of one slab, in float32 chunk copies of a slab: those of q, k, v, g and do, dq, dk, dv,
    `decay_k`, `k * decay_k`, a spare, stage 1's two factors, dA (half of one), the chunk states and their gradients
    (two each): 18. One pass peaked at 32.80 MiB here, slabs at 15.51 MiB; another float32 tensor of the whole problem
    (2 MiB) breaks the bound."""
    B, T, H, K, V, C, n = 1, 1024, 4, 128, 128, 64, 4
    f32 = 4
    monkeypatch.setitem(chunk._SLAB_BYTES, 'cpu', B * n * H * C * max(K, V) * f32)
    q, k, v, g = scaled_gpu1(B, T, H, K, V)
    do = torch.randn(B, T, H, V, dtype=torch.bfloat16)
    assert chunk._slab_chunks(q, v, chunk._Fixed(B, T, C)) == n
    peak = _cpu_peak_bytes(lambda: torch.autograd.grad(chunk_gla(q, k, v, g)[0], (q, k, v, g), do))
    out, A, grads = B * T * H * V * 2, B * T * H * C * f32, B * T * H * (3 * K + V) * 2
    copy, state = B * n * H * C * max(K, V) * f32, B * H * K * V * f32    # a slab's float32 chunk copy; one state
    starts, small = (T // C // n - 1) * state, 16 << 10
    assert peak <= out + A + grads + starts + 18 * copy + small, peak
