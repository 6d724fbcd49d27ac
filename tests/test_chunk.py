"""chunk_gla and fused_chunk_gla on CPU: FLA's test matrices (spec 9.2) at CPU-sized lengths against the float64
recurrence, strong gates over long sequences, property-based tests over shapes, chunk boundaries, gates and
varlen splits, bad input, and torch.compile. (The notebook holds the worked examples; tests/gpu/ the FLA parity.)"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from myfla_gla import assert_close, chunk_gla, fused_chunk_gla, naive_recurrent_gla, random_gla_inputs
import myfla_gla.ops.chunk as chunk_ops
from myfla_gla.testing import compare_op, op_inputs, run_op, run_reference
from helpers import run_with_compiled_passes, threads

NAMES = ['o', 'ht', 'dq', 'dk', 'dv', 'dg', 'dh0']


def check(B, T, H, K, V, dtype=torch.float32, normalizer=1., cu=None, h0=True, dht=True, clamp_min=None,
          scale=None, fns=(chunk_gla, fused_chunk_gla), ratio=None, state_v_first=False):
    "Every output and gradient of each fn against the float64 recurrence on the same (rounded) inputs."
    x = op_inputs('cpu', dtype, B, T, H, K, V, normalizer, cu_seqlens=cu, seed=None, h0=h0, dht=dht)
    if clamp_min is not None:
        x['g'] = x['g'].clamp_min(clamp_min)
    kw = dict(scale=scale, state_v_first=state_v_first, cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    ref, errs = run_reference(x, **kw), {}
    for fn in fns:
        e, res = compare_op(fn, x, 'g', ratio, reference=ref, **kw)
        assert res['o'].dtype == dtype and res['o'].shape == (B, T, H, V)
        assert res['ht'].dtype == torch.promote_types(dtype, torch.float32)
        errs[fn.__name__] = list(e.values())
    return errs


# FLA's tests/ops/test_gla.py matrices (spec 9.2), lengths and heads cut to CPU size; half precision as in FLA,
# and float32 too, where the bound is 1e-5.
@pytest.mark.parametrize('B, T, H, D, normalizer, dtype', [
    (1, 63, 1, 64, 1, torch.float16), (2, 200, 2, 60, 1, torch.float16), (2, 160, 2, 128, 0.1, torch.float16),
    (2, 160, 2, 128, 1, torch.float16), (2, 160, 2, 128, 10, torch.float16), (2, 256, 2, 64, 1, torch.float16),
    (1, 128, 2, 256, 1, torch.float16), (1, 64, 1, 320, 1, torch.float16), (1, 128, 1, 512, 1, torch.bfloat16),
    (1, 63, 1, 64, 1, torch.float32), (2, 200, 2, 60, 1, torch.float32), (2, 160, 2, 128, 0.1, torch.float32),
    (2, 160, 2, 128, 10, torch.float32), (1, 128, 2, 256, 1, torch.float32)])
def test_chunk(B, T, H, D, normalizer, dtype):
    check(B, T, H, D, D, dtype, normalizer)


@pytest.mark.parametrize('D, cu, dtype', [
    (64, [0, 15], torch.float16), (64, [0, 0, 16], torch.float16), (64, [0, 100, 250, 400], torch.float16),
    (100, [0, 15, 100, 300, 420, 500], torch.float16), (64, [0, 0, 16], torch.float32),
    (64, [0, 1, 100, 300, 301, 400], torch.float32), (32, [0, 64, 64, 128, 129, 192], torch.float32)])
def test_chunk_varlen(D, cu, dtype):
    check(1, cu[-1], 4, D, D, dtype, cu=cu)


@pytest.mark.parametrize('B, T, H, D, dtype', [(2, 256, 4, 64, torch.float32), (2, 200, 2, 128, torch.float16)])
def test_chunk_state_v_first(B, T, H, D, dtype):
    "state_v_first gives the same numbers as the [K, V] layout, transposed (and both match the recurrence)."
    check(B, T, H, D, D, dtype, state_v_first=True, fns=(chunk_gla,))
    q, k, v, g = random_gla_inputs(B, T, H, D, dtype=dtype)
    h0 = torch.rand(B, H, D, D)
    o1, h1 = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o2, h2 = chunk_gla(q, k, v, g, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
                       state_v_first=True)
    assert torch.equal(o1, o2) and torch.equal(h1, h2.transpose(-1, -2))


@pytest.mark.parametrize('T', [1, 2, 3, 5, 63, 64, 65, 127, 129])
def test_lengths_around_chunk_boundaries(T):
    check(2, T, 2, 8, 4, torch.float64, ratio=1e-12)


def test_strong_gates_T1024():
    "gate_logit_normalizer 0.02 (about -25 a token): float32 still within 1e-5 of float64, gradients included."
    check(1, 1024, 2, 32, 32, torch.float32, normalizer=0.02)


def test_clamp_min_gates():
    "Gates as GLA's clamp_min leaves them: many exactly at the clamp."
    check(1, 300, 2, 16, 16, torch.float32, normalizer=0.05, clamp_min=-3.)
    check(1, 300, 2, 16, 16, torch.float32, normalizer=16, clamp_min=-0.01)


def test_strong_gates_T4096():
    """T=4096 at normalizer 0.02, float32: the forward pass against the float64 recurrence, gradients against the
    float64 chunk form (which the other tests hold to the recurrence within 1e-12)."""
    x = op_inputs('cpu', torch.float32, 1, 4096, 1, 32, 32, 0.02, seed=None)
    x64 = {n: None if t is None else t.double() for n, t in x.items()}
    o_ref, h_ref = naive_recurrent_gla(x64['q'], x64['k'], x64['v'], x64['g'], x64['h0'], output_final_state=True)
    ref = run_op(chunk_gla, x64)
    assert_close('o64', o_ref, ref['o'], 1e-12, err_atol=0), assert_close('ht64', h_ref, ref['ht'], 1e-12, err_atol=0)
    for fn in (chunk_gla, fused_chunk_gla):
        compare_op(fn, x, 'g', 1e-5, reference=ref)


def test_extreme_gates_stay_finite():
    "Gates of -1000 and of exactly 0, large inputs: no NaN or inf anywhere."
    x = op_inputs('cpu', torch.float32, 2, 150, 2, 8, 8, seed=None, h0=False)
    x['g'] = torch.where(torch.rand_like(x['g']) < 0.5, torch.full_like(x['g'], -1000.), torch.zeros_like(x['g']))
    for n in ('q', 'k', 'v'):
        x[n] = x[n] * 30
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        res = run_op(chunk_gla, {n: t if n == 'dht' else t.to(dtype) for n, t in x.items() if t is not None})
        assert all(torch.isfinite(t).all() for t in res.values())
    check(2, 150, 2, 8, 8, torch.float64, normalizer=0.001, ratio=1e-12)


def test_positive_gates_are_outside_the_contract():
    """Gates are log decays (<= 0). Growth that adds up to more than float32's exp range (about 88) within a chunk
    gives inf or NaN from the chunk ops, as the chunk chapter and the differences page say, although the recurrence
    stays finite (nothing is stored before the growth); below that range the chunk ops follow the recurrence."""
    q, k, v, g = random_gla_inputs(1, 64, 2, 8)
    k[:, :20] = 0.
    for growth, finite in ((4.6, False), (3.5, True)):       # 92 and 70 over the first 20 tokens
        g[:, :20] = growth
        ref = naive_recurrent_gla(*(x.double() for x in (q, k, v, g)))[0]
        assert torch.isfinite(ref).all()
        for fn in (chunk_gla, fused_chunk_gla):
            o = fn(q, k, v, g)[0]
            assert bool(torch.isfinite(o).all()) == finite, (fn.__name__, growth)
            if finite:
                assert_close(f'{fn.__name__} growth {growth}', ref, o, 1e-5, err_atol=0)


def test_fused_matches_chunk():
    "Same inputs, same numbers to float32 rounding; also with an initial state and packed sequences."
    for cu in (None, [0, 0, 70, 200, 200]):
        x = op_inputs('cpu', torch.float32, 2 if cu is None else 1, 200, 2, 16, 8, cu_seqlens=cu, seed=None)
        kw = dict(cu_seqlens=None if cu is None else torch.tensor(cu))
        a, b_ = run_op(chunk_gla, x, **kw), run_op(fused_chunk_gla, x, **kw)
        for n in a:
            assert_close(f'fused vs chunk {n}', a[n], b_[n], 1e-6, err_atol=0)


def test_no_initial_state_no_final_state_gradient():
    check(2, 100, 2, 8, 8, torch.float32, h0=False, dht=False)
    check(1, 90, 2, 8, 8, torch.float32, h0=False, dht=True, cu=[0, 0, 30, 90])


def test_scale_and_mixed_dtypes():
    check(1, 80, 2, 8, 8, torch.float32, scale=0.37)
    q, k, v, g = random_gla_inputs(1, 80, 2, 8)
    o, ht = chunk_gla(q, k, v.bfloat16(), g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_ref = naive_recurrent_gla(*(x.double() for x in (q, k, v.bfloat16(), g)))[0]
    assert_close('mixed', o_ref, o, 5e-3, err_atol=0)


def test_cu_seqlens_dtypes_and_host_copy():
    q, k, v, g = random_gla_inputs(1, 100, 2, 8)
    outs = [chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=cpu)[0] for cu, cpu in
            [(torch.tensor([0, 30, 100]), None), (torch.tensor([0, 30, 100], dtype=torch.int32), None),
             (torch.tensor([0, 30, 100]), torch.tensor([0, 30, 100]))]]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    fused = fused_chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 30, 100]), cu_seqlens_cpu=torch.tensor([0, 30, 100]))[0]
    assert_close('fused varlen', outs[0], fused, 1e-6, err_atol=0)


def test_non_contiguous_inputs():
    q, k, v, g = random_gla_inputs(2, 70, 3, 8)
    qt, kt, vt, gt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v, g))
    assert not qt.is_contiguous()
    assert torch.equal(chunk_gla(q, k, v, g)[0], chunk_gla(qt, kt, vt, gt)[0])


def test_output_final_state_false_and_no_grad():
    q, k, v, g = random_gla_inputs(1, 40, 2, 4)
    o, ht = chunk_gla(q, k, v, g)
    assert ht is None
    with torch.no_grad():
        o2, _ = fused_chunk_gla(q, k, v, g)
    assert_close('no grad', o, o2, 1e-6, err_atol=0)


def test_float64_initial_state_and_state_dtypes():
    q, k, v, g = random_gla_inputs(1, 40, 2, 4, dtype=torch.float64)
    _, ht = chunk_gla(q, k, v, g, initial_state=torch.rand(1, 2, 4, 4, dtype=torch.float64), output_final_state=True)
    assert ht.dtype == torch.float64
    _, ht = chunk_gla(*(x.bfloat16() for x in (q, k, v, g)), initial_state=torch.rand(1, 2, 4, 4), output_final_state=True)
    assert ht.dtype == torch.float32


def test_bad_input():
    q, k, v, g = random_gla_inputs(1, 20, 2, 4)
    cu = torch.tensor([0, 5, 20])
    with pytest.raises(ValueError, match='batch size'):
        chunk_gla(*(x.expand(2, -1, -1, -1) for x in (q, k, v, g)), cu_seqlens=cu)
    with pytest.raises(ValueError, match='initial states'):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(3, 2, 4, 4), cu_seqlens=cu)
    with pytest.raises(AssertionError, match='initial_state must be in float32'):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match='`g` must be'):
        chunk_gla(q, k, v, g[..., :3])
    with pytest.raises(AssertionError, match='`k` must be'):
        chunk_gla(q, k[:, :10], v, g)
    with pytest.raises(AssertionError, match='`v` must be'):
        chunk_gla(q, k, v[:, :, :1], g)
    with pytest.raises(AssertionError, match='`initial_state` must be'):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(AssertionError, match=r'\[N, H, V, K\]'):
        chunk_gla(q, k, v[..., :3], g, initial_state=torch.zeros(1, 2, 4, 3), state_v_first=True)
    with pytest.raises(ValueError, match='cu_seqlens'):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 5, 19]))
    with pytest.raises(ValueError, match='cu_seqlens'):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 25, 20]))
    with pytest.raises(ValueError, match='cu_seqlens'):
        fused_chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([[0, 20]]))
    # the notebook's list, moved here: each message names the argument, the expected and the actual value
    with pytest.raises(ValueError, match=r'`k` must be \[B=1, T=20, H=2, K=4\], got shape \(1, 20, 2, 3\)'):
        chunk_gla(q, k[..., :3], v, g)
    with pytest.raises(ValueError, match='packed length 20; got'):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 5, 19]))
    with pytest.raises(TypeError, match='`q` must be a floating-point tensor'):
        chunk_gla(q.long(), k.long(), v.long(), g)
    with pytest.raises(TypeError, match='did you mean `initial_state`?'):
        fused_chunk_gla(q, k, v, g, initial_states=None)
    with pytest.raises(ValueError, match='cu_seqlens_cpu'):
        chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 10, 20]))


gates = st.sampled_from([(0.02, None), (0.1, None), (1., None), (16., None), (0.05, -2.)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), T=st.integers(1, 140), H=st.integers(1, 2), K=st.integers(1, 9), V=st.integers(1, 9),
       gate=gates, h0=st.booleans(), dht=st.booleans(), svf=st.booleans())
def test_property_fixed_length(B, T, H, K, V, gate, h0, dht, svf):
    check(B, T, H, K, V, torch.float64, normalizer=gate[0], clamp_min=gate[1], h0=h0, dht=dht, ratio=1e-11,
          state_v_first=svf)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(0, 90), min_size=1, max_size=5), K=st.integers(1, 8), gate=gates,
       h0=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_property_varlen(lens, K, gate, h0, dtype):
    cu = torch.tensor([0] + lens).cumsum(0).tolist()
    check(1, cu[-1], 2, K, 4, dtype, normalizer=gate[0], clamp_min=gate[1], cu=cu, h0=h0,
          ratio=1e-11 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize('cu', [None, [0, 0, 70, 200, 201]])
def test_compiled_walk_stacks_the_states(cu, monkeypatch):
    "The walk's path under torch.compile (entered states stacked, not written in place) gives the eager numbers."
    x = op_inputs('cpu', torch.float32, 1, 201, 2, 8, 8, cu_seqlens=cu, seed=None)
    kw = dict(cu_seqlens=None if cu is None else torch.tensor(cu))
    # the levels' stage 1: forced in eager, the one-product form's `torch.cond` would compile (and run Dynamo under
    # this patch, which leaves it unable to trace the real `is_compiling` in later tests)
    monkeypatch.setitem(chunk_ops._ONE_PRODUCT, 'cpu', False)
    eager = run_op(chunk_gla, x, **kw)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    compiled = run_op(chunk_gla, x, **kw)
    for name in NAMES:
        assert torch.equal(eager[name], compiled[name]), name


@pytest.mark.parametrize('cu', [None, [0, 0, 70, 200, 201]])
def test_forward_without_gradients_stacks_the_states_in_the_products_dtype(cu, monkeypatch):
    """The compiled walk's path (faked as above) with bf16 products (`_HALF_PRODUCTS`, CUDA's under torch.compile) and
    `_NARROW_STATES` on: a forward that no backward will follow (under `no_grad`, or inputs that need no gradient)
    stacks its chunk states in bf16, which stage 4 reads rounded to bf16 anyway, so its output and final state are
    bitwise those of a forward with gradients, whose states stay float32 for the backward. `fused_chunk_gla` keeps
    no states; with the switch off, float32 states."""
    x = op_inputs('cpu', torch.bfloat16, 1, 201, 2, 8, 8, cu_seqlens=cu, seed=None, h0=True)
    kw = dict(cu_seqlens=None if cu is None else torch.tensor(cu), initial_state=x['h0'], output_final_state=True)
    monkeypatch.setitem(chunk_ops._ONE_PRODUCT, 'cpu', False)   # (as above: no `torch.cond` under the patch)
    monkeypatch.setitem(chunk_ops._HALF_PRODUCTS, 'cpu', True)
    monkeypatch.setitem(chunk_ops._NARROW_STATES, 'cpu', True)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    stacked, walk = [], chunk_ops._walk
    def recorded(*args, **kw):
        out = walk(*args, **kw)
        stacked.append(out[0].dtype)
        return out
    monkeypatch.setattr(chunk_ops, '_walk', recorded)
    q, k, v, g = (x[n] for n in 'qkvg')
    want = chunk_gla(*(t.clone().requires_grad_() for t in (q, k, v, g)), **kw)
    assert stacked == [torch.float32]
    with torch.no_grad():
        got = chunk_gla(*(t.clone().requires_grad_() for t in (q, k, v, g)), **kw)
    assert stacked[1:] == [torch.bfloat16]
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(want, chunk_gla(q, k, v, g, **kw)))   # no input needs a gradient
    assert stacked[2:] == [torch.bfloat16]
    fused_chunk_gla(q, k, v, g, **kw)
    assert len(stacked) == 3
    monkeypatch.setitem(chunk_ops._NARROW_STATES, 'cpu', False)
    assert all(torch.equal(a, b) for a, b in zip(want, chunk_gla(q, k, v, g, **kw)))
    assert stacked[3:] == [torch.float32]


@pytest.mark.compile
@pytest.mark.parametrize('keep', [False, True])
def test_compile_matches_eager(monkeypatch, keep):
    """torch.compile(fullgraph=True) traces forward and backward (no graph break) and gives the eager numbers, through
    the chunked path, not the export path (Dynamo made `torch.compiler.is_exporting()` True before pytorch#176499).
    With the one-product stage 1 on (`_ONE_PRODUCT`), both branches of its `torch.cond`: weak gates (every chunk in one
    product), then the same shapes with head 1 at -25 a token (its chunks flagged, the levels). Chunks of 4 tokens
    (instead of 64 for this length): two dyadic levels to compile instead of six (m = 1 in its own form, m = 2 as
    every later level), since Inductor's time grows with each level. With the chunk states recomputed (the CPU's
    default) and kept for the backward (`_KEEP_STATES`, CUDA's)."""
    def export_path(*args):
        raise AssertionError('torch.compile took the export path')
    monkeypatch.setattr(chunk_ops, '_gla_while_exporting', export_path)
    monkeypatch.setitem(chunk_ops._ONE_PRODUCT, 'cpu', True)
    monkeypatch.setitem(chunk_ops._KEEP_STATES, 'cpu', keep)
    monkeypatch.setattr(chunk_ops, '_chunk_size', lambda T: 4)
    q, k, v, g = random_gla_inputs(2, 10, 2, 4, requires_grad=True)   # three chunks, the last one partial
    h0 = torch.rand(2, 2, 4, 4, requires_grad=True)
    strong = (g.detach() * torch.tensor([1., 50.])[:, None]).requires_grad_()

    def f(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss = lambda o: (o[0] ** 2).sum() + (o[1] ** 2).sum()
    for gates in (g, strong):   # the same shapes: one compilation
        flagged = chunk_ops._flagged(gates.detach().transpose(1, 2)[..., :4, :])   # the first chunks [B, H]
        assert flagged.tolist() == [[False, gates is strong]] * 2
        out, ref = compiled(q, k, v, gates, h0), f(q, k, v, gates, h0)
        grads = torch.autograd.grad(loss(out), (q, k, v, gates, h0))
        grads_ref = torch.autograd.grad(loss(ref), (q, k, v, gates, h0))
        for name, r, x in zip(NAMES, list(ref) + list(grads_ref), list(out) + list(grads)):
            assert_close(f'compiled {name}', r, x, 1e-6, err_atol=0)


@pytest.mark.compile
@pytest.mark.parametrize('slab', [None, 1])
def test_compiled_passes(monkeypatch, slab):
    """The layout passes compiled by Inductor (`_COMPILED_PASSES`) give the eager passes' numbers bitwise: output,
    final state and every gradient of bf16 inputs with a scale, two whole chunks and a part one, with CUDA's switches
    on one CPU thread (the lean forward's product with q where it lies, the kept states), in one slab (every
    whole-chunk pass compiled) and in slabs of one chunk (into and out of slices of the buffers), each pass through
    its `standalone_compile` artifact; a forward under inference mode too. Where Inductor fails, a warning, the switch
    off and the eager numbers."""
    for name, on in (('_ONE_PRODUCT', True), ('_LEAN_FORWARD', True), ('_KEEP_STATES', True), ('_SLAB_BYTES', slab)):
        monkeypatch.setitem(getattr(chunk_ops, name), 'cpu', on)
    monkeypatch.setattr(chunk_ops, '_PASS_ARTIFACTS', {})
    x = op_inputs('cpu', torch.bfloat16, 2, 150, 2, 16, 8)
    with threads(1):
        eager, compiled, ran = run_with_compiled_passes(monkeypatch, x, scale=0.3)
        # q (k's division by up stays eager); g, v, o, q, k, v, g, do, dq, dk, dv, dg: in slabs the two whole ones'
        assert (ran.count('mul'), ran.count('copy')) == ((1, 12) if slab is None else (2, 24)), ran
        assert {key[0] for key in chunk_ops._PASS_ARTIFACTS} == set(ran)   # through artifacts of both kinds
        for name in NAMES[:6]:
            assert torch.equal(eager[name], compiled[name]), name

        def inference(on):   # under inference mode the artifacts are traced from inference tensors
            monkeypatch.setitem(chunk_ops._COMPILED_PASSES, 'cpu', on)
            with torch.inference_mode():
                return chunk_gla(x['q'], x['k'], x['v'], x['g'], scale=0.3, initial_state=x['h0'],
                                 output_final_state=True)
        compiled_pass, calls = chunk_ops._compiled_pass, []
        monkeypatch.setattr(chunk_ops, '_compiled_pass', lambda *args: calls.append(args[0]) or compiled_pass(*args))
        assert all(map(torch.equal, inference(False), inference(True))) and calls

        def fails(*args, **kwargs):   # Inductor without a compiler, as `standalone_compile` reports it
            raise torch._inductor.exc.InductorError(RuntimeError('no compiler'), None)
        monkeypatch.setattr(chunk_ops, '_PASS_ARTIFACTS', {})
        monkeypatch.setattr(torch._inductor, 'standalone_compile', fails)
        with pytest.warns(UserWarning, match=r'(?s)layout passes stay eager on cpu.*no compiler'):
            out = run_op(chunk_gla, x, scale=0.3)
    assert chunk_ops._COMPILED_PASSES['cpu'] is False
    for name in NAMES[:6]:
        assert torch.equal(eager[name], out[name]), name


@pytest.mark.compile
def test_compiled_pass_limits(monkeypatch):
    """A layout pass is compiled only where it has at least `_COMPILED_MIN_NUMEL` elements and for the first
    `_PASS_GRAPHS` layouts (shapes, dtypes, strides) of its kind; elsewhere `_compiled` returns False, and the caller
    runs the eager pass. Layouts compiled before keep their artifacts; on a PyTorch without `standalone_compile`
    every pass stays eager."""
    monkeypatch.setitem(chunk_ops._COMPILED_PASSES, 'cpu', True)
    monkeypatch.setattr(chunk_ops, '_PASS_ARTIFACTS', {})
    monkeypatch.setattr(chunk_ops, '_COMPILED_MIN_NUMEL', 64)
    monkeypatch.setattr(chunk_ops, '_PASS_GRAPHS', 2)
    ran = []
    for n in (2, 8, 16, 24, 16, 8):   # [n, 4, 4] from a transposed bf16 source; the first under the size
        src, dst = torch.randn(4, n, 4).bfloat16().transpose(0, 1), torch.full((n, 4, 4), torch.nan)
        ran.append(chunk_ops._compiled('copy', dst, src))
        assert torch.equal(dst, src.float()) if ran[-1] else dst.isnan().all()
    assert ran == [False, True, True, False, True, True]   # (an artifact for the small one would leave no room for 16)
    assert len(chunk_ops._PASS_ARTIFACTS) == 2
    monkeypatch.delattr(torch._inductor, 'standalone_compile')
    src, dst = torch.randn(4, 8, 4).bfloat16().transpose(0, 1), torch.full((8, 4, 4), torch.nan)
    assert not chunk_ops._compiled('copy', dst, src) and dst.isnan().all()


@pytest.mark.compile
def test_compiled_pass_layouts(monkeypatch):
    """A pass's artifact (`_PASS_ARTIFACTS`) serves only the layout it was compiled for: the same shape with other
    strides, another dtype, a scale, or a destination off 16-byte alignment (a slice one float in) each get their own,
    and each gives the eager pass's numbers; a layout seen before takes its artifact again."""
    monkeypatch.setitem(chunk_ops._COMPILED_PASSES, 'cpu', True)
    monkeypatch.setattr(chunk_ops, '_PASS_ARTIFACTS', {})
    monkeypatch.setattr(chunk_ops, '_COMPILED_MIN_NUMEL', 1)
    src = torch.randn(3, 8, 4).bfloat16()
    buf = torch.full((1 + 8 * 3 * 4,), torch.nan)
    cases = [('copy', torch.empty(8, 3, 4), src.transpose(0, 1), None),
             ('copy', torch.empty(8, 3, 4), src.float().transpose(0, 1), None),
             ('copy', torch.empty(8, 3, 4), src.transpose(0, 1).contiguous(), None),
             ('copy', torch.empty(8, 3, 4), src.transpose(0, 1), 0.3),
             ('copy', buf[1:].view(8, 3, 4), src.transpose(0, 1), None),
             ('mul', torch.randn(8, 3, 4), src.transpose(0, 1), None),
             ('copy', torch.empty(8, 3, 4), src.transpose(0, 1), None)]   # the first layout again
    for i, (op, dst, s, scale) in enumerate(cases):
        want = dst * s if op == 'mul' else s.float() * scale if scale is not None else s.float()
        assert chunk_ops._compiled(op, dst, s, scale)
        assert torch.equal(dst, want), i
        assert len(chunk_ops._PASS_ARTIFACTS) == min(i + 1, len(cases) - 1), i


@pytest.mark.compile
def test_compiled_pass_threads(monkeypatch):
    """Threads that meet a new layout at once compile its artifact once (`_PASS_ARTIFACTS` is filled under a lock) and
    each gets the eager pass's numbers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setitem(chunk_ops._COMPILED_PASSES, 'cpu', True)
    monkeypatch.setattr(chunk_ops, '_PASS_ARTIFACTS', {})
    monkeypatch.setattr(chunk_ops, '_COMPILED_MIN_NUMEL', 1)
    compile_, compiles = torch._inductor.standalone_compile, []

    def counted(*args, **kwargs):
        compiles.append(1)
        return compile_(*args, **kwargs)
    monkeypatch.setattr(torch._inductor, 'standalone_compile', counted)
    src = torch.randn(3, 8, 4).bfloat16().transpose(0, 1)
    dsts = [torch.full((8, 3, 4), torch.nan) for _ in range(4)]
    start = threading.Barrier(len(dsts))   # all four at the new layout at once

    def work(dst):
        start.wait()
        return chunk_ops._compiled('copy', dst, src)
    with ThreadPoolExecutor(len(dsts)) as pool:
        ran = list(pool.map(work, dsts))
    assert ran == [True] * len(dsts) and len(compiles) == 1
    for dst in dsts:
        assert torch.equal(dst, src.float())


def test_env_switch(monkeypatch):
    """MYFLA_GLA_COMPILED_PASSES-style switches: '1' on, '0' off, unset the default, anything else refused; and that
    switch's default (on for CUDA)."""
    for value, default, want in (('1', False, True), ('0', True, False), (None, True, True), (None, False, False)):
        if value is None:
            monkeypatch.delenv('MYFLA_X', raising=False)
        else:
            monkeypatch.setenv('MYFLA_X', value)
        assert chunk_ops._env_switch('MYFLA_X', default) is want
    monkeypatch.setenv('MYFLA_X', 'yes')
    with pytest.raises(ValueError, match="MYFLA_X: expected '0' or '1', got 'yes'"):
        chunk_ops._env_switch('MYFLA_X', False)
    # the package's switch as the environment of this run sets it: on CUDA compiled unless it says '0', never on the CPU
    assert chunk_ops._COMPILED_PASSES == {'cuda': os.environ.get('MYFLA_GLA_COMPILED_PASSES') != '0'}
