"""fused_recurrent_gla against the float64 reference: FLA's test matrices at CPU-sized lengths (spec 9.2), what they
leave out (value gate, reverse, scale), gradcheck, decoding, property tests and bad input.
(The notebook nbs/03_recurrent.ipynb holds the worked examples; tests/gpu/test_recurrent_fla.py the FLA parity.)"""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from myfla_gla import (DEFAULT_RATIO, assert_close, fused_recurrent_gla, naive_recurrent_gla, random_gla_inputs,
                       reference_recurrent_gla)
from myfla_gla.testing import compare_op, op_inputs, run_op


def make(B, T, H, K, V=None, norm=1., dtype=torch.float32, use_gk=True, use_gv=False, h0=True, cu=None):
    "FLA's test inputs (`op_inputs`), without the key gate when `use_gk` is False."
    x = op_inputs('cpu', dtype, B, T, H, K, V or K, norm, cu_seqlens=cu, seed=None, gv=use_gv, h0=h0)
    if not use_gk:
        x['g'] = None
    return x


def compare(x, **kw):
    "Every output and gradient of fused_recurrent_gla vs the float64 reference, each at the bound of its own dtype."
    return compare_op(fused_recurrent_gla, x, 'gk', DEFAULT_RATIO, **kw)[1]


# --- FLA's matrices (tests/ops/test_gla.py) at CPU-sized T -------------------------------------------------------

@pytest.mark.parametrize('B, T, H, D, norm, dtype', [
    (1, 63, 1, 64, 1, torch.float32),
    (2, 130, 2, 60, 1, torch.float32),
    (2, 100, 4, 128, 0.1, torch.float32),
    (2, 100, 4, 128, 1, torch.float32),
    (2, 100, 4, 128, 10, torch.float32),
    (4, 150, 2, 64, 1, torch.float32),
    (2, 100, 4, 128, 0.1, torch.float16),
    (2, 100, 4, 128, 10, torch.float16),
    (2, 70, 2, 64, 1, torch.bfloat16),
])
def test_fused_recurrent(B, T, H, D, norm, dtype):
    got = compare(make(B, T, H, D, norm=norm, dtype=dtype))
    assert got['o'].dtype == dtype and got['ht'].dtype == torch.float32 and got['dh0'].dtype == torch.float32
    assert all(got[n].dtype == dtype for n in ('dq', 'dk', 'dv', 'dg'))


@pytest.mark.parametrize('B, T, H, D, dtype', [(2, 256, 2, 64, torch.float32), (2, 100, 2, 128, torch.float16)])
def test_fused_recurrent_state_v_first(B, T, H, D, dtype):
    x = make(B, T, H, D, dtype=dtype)
    kv = run_op(fused_recurrent_gla, x, 'gk')
    vk = run_op(fused_recurrent_gla, x, 'gk', state_v_first=True)   # states go in and come back transposed
    for n in kv:
        assert_close(n, kv[n].double(), vk[n], 1e-6 if dtype == torch.float32 else 1e-3, err_atol=0)
    compare(x, state_v_first=True)
    t = lambda x: x.transpose(-1, -2).contiguous()
    q, k, v, gk = x['q'], x['k'], x['v'], x['g']
    with pytest.warns(DeprecationWarning):
        o, ht = fused_recurrent_gla(q, k, v, gk, initial_state=t(x['h0']), output_final_state=True,
                                    transpose_state_layout=True)
    assert torch.equal(t(ht), vk['ht'].detach())
    with pytest.raises(ValueError, match='transpose_state_layout'):
        fused_recurrent_gla(q, k, v, gk, state_v_first=True, transpose_state_layout=True)
    with pytest.raises(ValueError, match='transpose_state_layout'):  # as FLA: any value together with True
        fused_recurrent_gla(q, k, v, gk, state_v_first=True, transpose_state_layout=False)


@pytest.mark.parametrize('H, D, cu, dtype', [
    (4, 64, [0, 15], torch.float32),
    (4, 64, [0, 64, 125, 250], torch.float32),
    (4, 100, [0, 15, 25, 75, 200, 256], torch.float32),
    (4, 64, [0, 1, 25, 75, 150, 256], torch.float16),
    (4, 128, [0, 50, 128, 150, 200], torch.float16),
    (2, 32, [0, 0, 16, 16, 40, 40], torch.float32),        # zero-length sequences, first and last too
])
@pytest.mark.parametrize('cu_dtype', [torch.int32, torch.int64])
def test_fused_recurrent_varlen(H, D, cu, dtype, cu_dtype):
    x = make(1, cu[-1], H, D, dtype=dtype, cu=cu)
    got = compare(x, cu_seqlens=torch.tensor(cu, dtype=cu_dtype))
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        if s == e:  # an empty sequence passes its state, and the gradient of its final state, through unchanged
            assert torch.equal(got['ht'][n], x['h0'][n])
            assert torch.equal(got['dh0'][n], x['dht'][n])


def test_varlen_equals_batch():
    x = make(3, 50, 2, 16, use_gv=True)
    packed = {n: t if n in ('h0', 'dht') else t.reshape(1, -1, *t.shape[2:]) for n, t in x.items()}
    a = run_op(fused_recurrent_gla, x, 'gk', reverse=True)
    b = run_op(fused_recurrent_gla, packed, 'gk', reverse=True, cu_seqlens=torch.tensor([0, 50, 100, 150]))
    for n in a:
        x = b[n] if n in ('ht', 'dh0') else b[n].reshape(a[n].shape)
        assert_close(n, a[n], x, 1e-6, err_atol=0)


# --- what FLA's tests leave out ------------------------------------------------------------------------------------

@pytest.mark.parametrize('opts', [
    dict(use_gv=True),
    dict(use_gv=True, use_gk=False),
    dict(use_gk=False),
    dict(reverse=True),
    dict(reverse=True, use_gv=True, state_v_first=True),
    dict(scale=0.37),
    dict(scale=1.0, reverse=True),
    dict(h0=False),
    dict(norm=0.1, use_gv=True),
    dict(norm=0.02),
    dict(norm=0.02, use_gv=True, reverse=True),
    dict(T=1, use_gv=True),
    dict(T=1, h0=False, state_v_first=True),
    dict(T=65),
    dict(T=129, V=24),
    dict(K=24, V=40, use_gv=True),
])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_options(opts, dtype):
    opts = dict(opts)
    shape = dict(B=2, T=opts.pop('T', 77), H=2, K=opts.pop('K', 32), V=opts.pop('V', None))
    kw = {n: opts.pop(n) for n in ('scale', 'reverse', 'state_v_first') if n in opts}
    compare(make(**shape, dtype=dtype, **opts), **kw)


@pytest.mark.parametrize('T', [0, 1, 2, 5])
def test_short_and_empty(T):
    x = make(2, T, 2, 8, use_gv=True, dtype=torch.float64)
    compare(x)
    q, k, v, gk, gv, h0 = (x[n] for n in ('q', 'k', 'v', 'g', 'gv', 'h0'))
    o, ht = fused_recurrent_gla(q, k, v, gk, gv, output_final_state=True)
    assert o.shape == (2, T, 2, 8) and ht.shape == (2, 2, 8, 8)
    if T == 0:
        assert torch.equal(ht, torch.zeros_like(ht))
        assert torch.equal(fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)[1], h0)


def test_checkpoint_interval_does_not_change_results():
    x = make(2, 40, 2, 8, use_gv=True, dtype=torch.float64)
    ref = run_op(fused_recurrent_gla, x, 'gk', reverse=True)
    for every in (1, 3, 39, 40, 1000):
        got = run_op(fused_recurrent_gla, x, 'gk', reverse=True, checkpoint_every=every)
        for n in ref:
            assert_close(n, ref[n], got[n], 1e-14, err_atol=0)


def test_matches_naive_recurrent_gla():
    q, k, v, gk = random_gla_inputs(2, 90, 3, 16, 12)
    h0 = torch.rand(2, 3, 16, 12)
    o1, S1 = naive_recurrent_gla(q, k, v, gk, h0, output_final_state=True)
    o2, S2 = fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    assert_close('o', o1, o2, 1e-6, err_atol=0), assert_close('S', S1, S2, 1e-6, err_atol=0)


# --- gradcheck in float64 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('opts', [
    dict(),
    dict(reverse=True),
    dict(state_v_first=True),
    dict(reverse=True, state_v_first=True, scale=0.7),
    dict(cu=[0, 3, 3, 8]),
    dict(cu=[0, 5, 6, 8], reverse=True, state_v_first=True),
    dict(no_gk=True),
    dict(T=1),
    dict(cu=[0, 1, 2, 3]),   # packed decoding: one token per sequence
])
def test_gradcheck(opts):
    opts = dict(opts)
    cu = opts.pop('cu', None)
    T = cu[-1] if cu else opts.pop('T', 7)
    B, N = (1, len(cu) - 1) if cu else (2, 2)
    q, k, v, gk = random_gla_inputs(B, T, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    gv = random_gla_inputs(B, T, 2, 4, dtype=torch.float64, requires_grad=True)[3]
    if opts.pop('no_gk', False):
        gk = None
    vf = opts.get('state_v_first', False)
    h0 = torch.randn(N, 2, *((4, 3) if vf else (3, 4)), dtype=torch.float64, requires_grad=True)
    kw = dict(opts, output_final_state=True, checkpoint_every=3,
              cu_seqlens=None if cu is None else torch.tensor(cu))
    f = lambda q, k, v, gk, gv, h0: fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, **kw)
    assert torch.autograd.gradcheck(f, (q, k, v, gk, gv, h0))


def test_gradient_only_through_final_state_and_partial_inputs():
    q, k, v, gk = random_gla_inputs(1, 20, 2, 4, dtype=torch.float64)
    h0 = torch.rand(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    v.requires_grad_()
    f = lambda v, h0: fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True,
                                          checkpoint_every=6)[1]
    assert torch.autograd.gradcheck(f, (v, h0))
    # a gradient into the final state only, with the default checkpointing
    _, ht = fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    _, ht_ref = reference_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    g = torch.autograd.grad(ht.sum(), (v, h0))
    g_ref = torch.autograd.grad(ht_ref.sum(), (v, h0))
    for a, b in zip(g_ref, g):
        assert_close('grad', a, b, 1e-12, err_atol=0)


# --- decoding ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('state_v_first', [False, True])
@pytest.mark.parametrize('packed', [False, True])
def test_token_by_token_equals_full(state_v_first, packed):
    B, T, H, K, V = 3, 9, 2, 8, 6
    q, k, v, gk = random_gla_inputs(B, T, H, K, V, dtype=torch.float64)
    gv = random_gla_inputs(B, T, H, V, dtype=torch.float64)[3]
    h0 = torch.rand(B, H, *((V, K) if state_v_first else (K, V)), dtype=torch.float64)
    kw = dict(output_final_state=True, state_v_first=state_v_first)
    o_full, S_full = fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, **kw)
    S, outs = h0, []
    for t in range(T):
        x = [y[:, t:t + 1] for y in (q, k, v, gk, gv)]
        if packed:  # what the layer does with a padding mask: one token per sequence, packed along time
            x = [y.transpose(0, 1) for y in x]
            o, S = fused_recurrent_gla(*x, initial_state=S, cu_seqlens=torch.arange(B + 1, dtype=torch.int32), **kw)
            o = o.transpose(0, 1)
        else:
            o, S = fused_recurrent_gla(*x, initial_state=S, **kw)
        outs.append(o)
    assert_close('o', o_full, torch.cat(outs, 1), 1e-13, err_atol=0)
    assert_close('S', S_full, S, 1e-13, err_atol=0)


def test_decoding_does_not_touch_inputs():
    h0 = torch.rand(2, 2, 8, 8)
    saved = h0.clone()
    for T in (1, 5):
        q, k, v, gk = random_gla_inputs(2, T, 2, 8)
        fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
        fused_recurrent_gla(q, k, v, gk, initial_state=h0, state_v_first=True, output_final_state=True)
    assert torch.equal(h0, saved)


# --- dtypes, layouts and odd inputs ----------------------------------------------------------------------------------

def test_dtypes_and_layout():
    q, k, v, gk = random_gla_inputs(2, 30, 2, 8, 4, dtype=torch.bfloat16)
    h0 = torch.rand(2, 2, 8, 4, dtype=torch.bfloat16, requires_grad=True)   # any float dtype is accepted
    o, ht = fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32 and o.is_contiguous() and ht.is_contiguous()
    ht.sum().backward()
    assert h0.grad.dtype == torch.bfloat16
    _, ht = fused_recurrent_gla(q, k, v, gk, initial_state=h0.transpose(-1, -2), output_final_state=True,
                                state_v_first=True, reverse=True)
    assert ht.shape == (2, 2, 4, 8) and ht.is_contiguous()
    o, ht = fused_recurrent_gla(q, k, v, gk, output_final_state=False)
    assert ht is None and o.shape == (2, 30, 2, 4)


def test_non_contiguous_inputs():
    qkv = torch.rand(2, 20, 3, 2, 8, dtype=torch.float64)   # a fused projection, split without copying
    q, k, v = qkv.unbind(2)
    gk = torch.nn.functional.logsigmoid(torch.rand(2, 8, 20, 2, dtype=torch.float64)).permute(0, 2, 3, 1)
    o1, S1 = fused_recurrent_gla(q, k, v, gk, output_final_state=True)
    o2, S2 = fused_recurrent_gla(*(x.contiguous() for x in (q, k, v, gk)), output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


def test_unknown_kwargs_raise():
    "FLA ignores keywords it does not read; here they are a TypeError naming them (`head_first=False` is FLA's own)."
    q, k, v, gk = random_gla_inputs(1, 5, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        o, _ = fused_recurrent_gla(q, k, v, gk, head_first=False)
    assert torch.equal(o, fused_recurrent_gla(q, k, v, gk)[0])
    with pytest.raises(TypeError, match='some_future_option'):
        fused_recurrent_gla(q, k, v, gk, some_future_option=3)


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(0, 9), min_size=1, max_size=4), reverse=st.booleans(), v_first=st.booleans(),
       gates=st.sampled_from(['gk', 'gv', 'both', 'none']), h0=st.booleans(), every=st.integers(1, 5))
def test_packed_matches_reference(lens, reverse, v_first, gates, h0, every):
    cu = torch.tensor([0] + lens).cumsum(0)
    T, N = int(cu[-1]), len(lens)
    q, k, v, gk = random_gla_inputs(1, T, 2, 3, 2, dtype=torch.float64)
    gv = random_gla_inputs(1, T, 2, 2, dtype=torch.float64)[3]
    gk, gv = (gk if gates in ('gk', 'both') else None), (gv if gates in ('gv', 'both') else None)
    h = torch.randn(N, 2, *((2, 3) if v_first else (3, 2)), dtype=torch.float64) if h0 else None
    kw = dict(initial_state=h, output_final_state=True, reverse=reverse, state_v_first=v_first, cu_seqlens=cu)
    o, S = fused_recurrent_gla(q, k, v, gk, gv, checkpoint_every=every, **kw)
    o_ref, S_ref = reference_recurrent_gla(q, k, v, gk, gv, **kw)
    assert_close('o', o_ref, o, 1e-12, err_atol=0), assert_close('S', S_ref, S, 1e-12, err_atol=0)


# --- bad input -------------------------------------------------------------------------------------------------------

def bad(**over):
    q, k, v, gk = random_gla_inputs(2, 5, 2, 4, 3)
    args = dict(q=q, k=k, v=v, gk=gk)
    args.update(over)
    return args


@pytest.mark.parametrize('args, match', [
    (bad(q=torch.rand(2, 5, 8)), '`q`'),
    (bad(k=torch.rand(2, 5, 2, 3)), '`k`'),
    (bad(gk=torch.rand(2, 5, 2, 3)), '`gk`'),
    (bad(v=torch.rand(2, 4, 2, 3)), '`v`'),
    (bad(v=torch.rand(2, 5, 3)), '`v`'),
    (bad(gv=torch.rand(2, 5, 2, 4)), '`gv`'),
    (bad(initial_state=torch.rand(2, 2, 3, 4)), '`initial_state`'),
    (bad(initial_state=torch.rand(2, 2, 4, 3), state_v_first=True), '`initial_state`'),
    (bad(initial_state=torch.rand(3, 2, 4, 3)), '`initial_state`'),
    (bad(k=torch.randint(0, 3, (2, 5, 2, 4))), '`k`'),
    (bad(cu_seqlens=torch.tensor([0, 5, 10])), 'batch size'),
    (bad(checkpoint_every=0), 'checkpoint_every'),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fused_recurrent_gla(**args)


def test_bad_packed_input():
    q, k, v, gk = random_gla_inputs(1, 10, 2, 4)
    with pytest.raises(ValueError, match='initial states'):  # FLA's message
        fused_recurrent_gla(q, k, v, gk, initial_state=torch.rand(3, 2, 4, 4), cu_seqlens=torch.tensor([0, 4, 10]))
    for cu in ([0, 4, 9], [1, 4, 10], [0, 6, 4, 10]):
        with pytest.raises(ValueError, match='cu_seqlens'):
            fused_recurrent_gla(q, k, v, gk, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match='cu_seqlens'):
        fused_recurrent_gla(q, k, v, gk, cu_seqlens=torch.tensor([0., 10.]))
