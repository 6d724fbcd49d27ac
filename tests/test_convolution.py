"""ShortConvolution: FLA's test matrix (spec 9.3) at CPU size against the float64 reference, decoding against the
full pass with non-zero weights, packed batches with per-sequence caches (hypothesis), the two FLA bugs fixed
(spec 10.7, 10.21), autograd through the in-place cache, and bad input. The notebook holds the worked examples."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from myfla_gla import ShortConvolution, assert_close, causal_conv1d, causal_conv1d_update, naive_causal_conv1d

RATIO = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def make(D, W, bias=True, activation='silu', dtype=torch.float32):
    return ShortConvolution(D, W, bias=bias, activation=activation, dtype=dtype)


def rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def grads(y, final, dy, dh, inputs):
    loss = (y.double() * dy).sum() + (0 if final is None else (final.double() * dh).sum())
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def check_against_reference(conv, x, r, h0, cu=None, output_final_state=True):
    dtype = x.dtype
    y, final = conv(x, residual=r, cache=h0, output_final_state=output_final_state, cu_seqlens=cu)
    y_ref, f_ref = naive_causal_conv1d(x, conv.weight[:, 0], conv.bias, r, h0, conv.activation, cu)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close('y', y_ref, y, RATIO[dtype], err_atol=0)
    if output_final_state:
        assert final.dtype == dtype
        assert_close('final', f_ref, final, RATIO[dtype], err_atol=0)
    else:
        assert final is None
    # gradients with output gradients representable in the dtype
    dy = torch.randn(y.shape, dtype=dtype).double()
    dh = torch.randn(f_ref.shape, dtype=dtype).double()
    inputs = [t for t in (x, r, h0, conv.weight, conv.bias) if t is not None]
    for a, b in zip(grads(y_ref, f_ref if output_final_state else None, dy, dh, inputs),
                    grads(y, final, dy, dh, inputs)):
        assert_close('grad', a, b, RATIO[dtype], err_atol=0)


@pytest.mark.parametrize('W', [2, 3, 4])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('activation', ['silu', None])
@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('cache', [False, True])
def test_dense_matrix(W, bias, activation, residual, cache, dtype=torch.float32):
    B, T, D = 2, 13, 16
    conv = make(D, W, bias, activation, dtype)
    x, r, h0 = rand(B, T, D, dtype=dtype), (rand(B, T, D, dtype=dtype) if residual else None), \
        (rand(B, D, W, dtype=dtype) if cache else None)
    check_against_reference(conv, x, r, h0)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('cache', [False, True])
def test_dense_half(dtype, cache):
    # half-precision module and inputs: computed in float32, rounded once at the end
    test_dense_matrix(4, True, 'silu', True, cache, dtype)


@pytest.mark.parametrize('T', [1, 2, 3, 4])
@pytest.mark.parametrize('W', [3, 4])
def test_prefill_shorter_than_kernel(T, W):
    # FLA's test_conv_with_cache_prefill_fwd: slot -p of the new cache is x[-p] if p <= T, else the old cache
    conv = make(8, W, dtype=torch.float64)
    x, h0 = rand(2, T, 8, dtype=torch.float64), rand(2, 8, W, dtype=torch.float64)
    with torch.no_grad():
        _, final = conv(x, cache=h0, output_final_state=True) if T > 1 else \
            causal_conv1d(x, conv.weight[:, 0], conv.bias, None, h0, True, 'silu')
    for p in range(1, W + 1):
        want = x[:, -p] if p <= T else h0[:, :, -p + T]
        assert torch.equal(final[:, :, -p], want)
    check_against_reference(conv, x, rand(2, T, 8, dtype=torch.float64), h0)


@pytest.mark.parametrize('output_final_state', [False, True])
def test_varlen_with_caches(output_final_state):
    cu = torch.tensor([0, 16, 16, 19, 20, 50], dtype=torch.int32)    # an empty sequence, ones shorter than W
    conv = make(12, 4)
    check_against_reference(conv, rand(1, 50, 12), rand(1, 50, 12), rand(5, 12, 4), cu, output_final_state)
    check_against_reference(conv, rand(1, 50, 12), None, None, cu.long(), output_final_state)


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(0, 7), min_size=1, max_size=5), W=st.integers(2, 4),
       cache=st.booleans(), bias=st.booleans())
def test_varlen_equals_each_sequence_alone(lens, W, cache, bias):
    torch.manual_seed(sum(lens) + W)
    cu = torch.tensor([0] + lens).cumsum(0)
    T, N, D = sum(lens), len(lens), 3
    conv = make(D, W, bias, dtype=torch.float64)
    x, h0 = torch.randn(1, T, D, dtype=torch.float64), (torch.randn(N, D, W, dtype=torch.float64) if cache else None)
    with torch.no_grad():
        y, final = conv(x, cache=h0, cu_seqlens=cu, output_final_state=True) if T != N or set(lens) != {1} else \
            causal_conv1d(x, conv.weight[:, 0], conv.bias, None, h0, True, 'silu', cu_seqlens=cu)
        y_ref, f_ref = naive_causal_conv1d(x, conv.weight[:, 0], conv.bias, None, h0, 'silu', cu)
        # and each sequence run alone through the dense path
        for n in range(N):
            xs = x[:, cu[n]:cu[n + 1]]
            ys, fs = causal_conv1d(xs, conv.weight[:, 0], conv.bias, None, None if h0 is None else h0[n:n + 1],
                                   True, 'silu')
            assert_close('alone y', ys, y[:, cu[n]:cu[n + 1]], 1e-12, err_atol=0)
            assert_close('alone final', fs[0], final[n], 1e-12, err_atol=0)
    assert_close('y', y_ref, y, 1e-12, err_atol=0)
    assert_close('final', f_ref, final, 1e-12, err_atol=0)


@pytest.mark.parametrize('W', [2, 3, 4])
@pytest.mark.parametrize('prefill', [0, 1, 5])
def test_decoding_equals_full_pass(W, prefill):
    # non-zero weights (FLA's decoding test zeroes them); prefill part of the sequence, then one token at a time
    B, T, D = 3, 9, 10
    conv = make(D, W)
    x, r, h0 = rand(B, T, D, grad=False), rand(B, T, D, grad=False), rand(B, D, W, grad=False)
    with torch.no_grad():
        y, final = conv(x, residual=r, cache=h0, output_final_state=True)
        if prefill:
            y0, cache = conv(x[:, :prefill], residual=r[:, :prefill], cache=h0, output_final_state=True)
        else:
            y0, cache = y[:, :0], h0.clone()
        ys = [y0]
        for t in range(prefill, T):
            y_t, c = conv(x[:, t:t + 1], residual=r[:, t:t + 1], cache=cache, output_final_state=t % 2 == 0)
            assert c is (cache if t % 2 == 0 else None)   # written in place; returned only when asked
            ys.append(y_t)
    assert_close('decode y', y, torch.cat(ys, 1), 1e-5, err_atol=0)
    assert_close('decode cache', final, cache, 1e-5, err_atol=0)


def test_decoding_without_cache_equals_full_pass():
    conv = make(6, 4)
    x = rand(2, 1, 6, grad=False)
    with torch.no_grad():
        y, c = conv(x, output_final_state=True)
        y_ref, f_ref = naive_causal_conv1d(x, conv.weight[:, 0], conv.bias, None, None, 'silu')
    assert_close('y', y_ref, y, 1e-5, err_atol=0)
    assert torch.equal(c[..., :-1], torch.zeros(2, 6, 3)) and torch.equal(c[..., -1], x[:, 0])


def test_packed_decoding_step():
    conv = make(6, 3)
    x, h0 = rand(1, 4, 6, grad=False), rand(4, 6, 3, grad=False)
    c1, c2 = h0.clone(), h0.clone()
    with torch.no_grad():
        y1, out = conv(x, cache=c1, cu_seqlens=torch.tensor([0, 1, 2, 3, 4]), output_final_state=True)
        y2, _ = conv(x.transpose(0, 1), cache=c2)
    assert out is c1 and torch.equal(c1, c2) and torch.equal(y1, y2.transpose(0, 1))
    assert torch.equal(c1[..., -1], x[0]) and torch.equal(c1[..., :-1], h0[..., 1:])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('how', ['module', 'functional step'])
def test_gradients_through_decoding_loop(dtype, how):
    # with autograd on, the module runs the full pass per token and returns new caches; the functional step
    # writes in place and autograd records it: either loop gives the full pass's gradients
    conv = make(5, 3, dtype=dtype)
    x, r, h0 = rand(2, 6, 5, dtype=dtype), rand(2, 6, 5, dtype=dtype), rand(2, 5, 3, dtype=dtype)
    dy, dh = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    inputs = (x, r, h0, conv.weight, conv.bias)
    y, final = conv(x, residual=r, cache=h0, output_final_state=True)
    cache, ys = (h0 if how == 'module' else h0 * 1), []
    for t in range(6):
        if how == 'module':
            y_t, cache = conv(x[:, t:t + 1], residual=r[:, t:t + 1], cache=cache, output_final_state=True)
        else:
            y_t, _ = causal_conv1d_update(x[:, t:t + 1], cache, r[:, t:t + 1], conv.weight[:, 0], conv.bias, 'silu')
        ys.append(y_t)
    for a, b in zip(grads(y, final, dy, dh, inputs), grads(torch.cat(ys, 1), cache, dy, dh, inputs)):
        assert_close('grad', a, b, RATIO[dtype], err_atol=0)


def test_one_token_with_autograd_returns_a_new_cache():
    # as in FLA 0.6.0: the in-place step only runs with autograd off
    conv = make(4, 3)
    x, h0 = rand(2, 1, 4), rand(2, 4, 3, grad=False)
    before = h0.clone()
    y, c = conv(x, cache=h0, output_final_state=True)
    assert c is not h0 and torch.equal(h0, before) and y.requires_grad
    with torch.no_grad():
        y2, c2 = conv(x, cache=h0, output_final_state=True)
    assert c2 is h0 and torch.equal(c2, c)
    assert_close('y', y.detach(), y2, 1e-6, err_atol=0)


def test_step_on_leaf_cache_that_requires_grad():
    # PyTorch forbids writing into it: the step returns a new cache and leaves the argument alone
    conv = make(4, 3)
    x, h0 = rand(2, 1, 4), rand(2, 4, 3)
    before = h0.detach().clone()
    y, c = causal_conv1d_update(x, h0, None, conv.weight[:, 0], conv.bias, 'silu')
    assert c is not h0 and torch.equal(h0.detach(), before)
    assert torch.equal(c[..., :-1], h0[..., 1:]) and torch.equal(c[..., -1], x[:, 0])
    y.sum().backward()
    assert h0.grad is not None and x.grad is not None and h0.grad[..., 0].eq(0).all()


def test_update_gradcheck():
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    def f(x, w, b, r, h):
        return causal_conv1d_update(x, h * 1, r, w, b, 'silu')
    assert torch.autograd.gradcheck(f, (mk(3, 1, 4), mk(4, 3), mk(4), mk(3, 1, 4), mk(3, 4, 3)))


def test_fla_bug_10_7_not_a_decoding_step():
    # as many tokens as sequences, but not one each: FLA would treat token i as sequence i's only token
    conv = make(4, 3)
    x, h0 = rand(1, 2, 4, grad=False), rand(2, 4, 3, grad=False)
    for cu in ([0, 0, 2], [0, 2, 2]):
        cu = torch.tensor(cu, dtype=torch.int32)
        c = h0.clone()
        with torch.no_grad():
            y, final = conv(x, cache=c, cu_seqlens=cu, output_final_state=True)
            y_ref, f_ref = naive_causal_conv1d(x, conv.weight[:, 0], conv.bias, None, h0, 'silu', cu)
        assert_close('y', y_ref, y, 1e-5, err_atol=0)
        assert_close('final', f_ref, final, 1e-5, err_atol=0)
        assert torch.equal(c, h0)      # the full path returns a new cache and leaves the old one alone


def test_fla_bug_10_21_mask_leaves_x_alone():
    conv = make(4, 3)
    x = rand(2, 5, 4, grad=False)
    x0 = x.clone()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        y, _ = conv(x, mask=mask)
        y_ref, _ = conv(x * mask[..., None])
    assert torch.equal(x, x0) and torch.equal(y, y_ref)


def test_empty_inputs():
    conv = make(4, 3)
    h0 = rand(2, 4, 3, grad=False)
    with torch.no_grad():
        y, final = conv(torch.randn(2, 0, 4), cache=h0, output_final_state=True)
        assert y.shape == (2, 0, 4) and torch.equal(final, h0) and final is not h0
        y, final = conv(torch.randn(1, 0, 4), cu_seqlens=torch.tensor([0, 0, 0]), cache=h0, output_final_state=True)
        assert y.shape == (1, 0, 4) and torch.equal(final, h0)


def test_non_contiguous_input():
    conv = make(8, 4)
    qkv = torch.randn(2, 7, 24)
    x, h0 = qkv[..., 8:16], torch.randn(2, 8, 4)
    with torch.no_grad():
        y1, f1 = conv(x, cache=h0, output_final_state=True)
        y2, f2 = conv(x.contiguous(), cache=h0, output_final_state=True)
        y3, f3 = conv(qkv[:1, :, 8:16], cu_seqlens=torch.tensor([0, 3, 7]), cache=h0, output_final_state=True)
        y4, f4 = conv(x[:1].contiguous(), cu_seqlens=torch.tensor([0, 3, 7]), cache=h0, output_final_state=True)
    assert torch.equal(y1, y2) and torch.equal(f1, f2) and torch.equal(y3, y4) and torch.equal(f3, f4)


def test_parameters_load_from_a_depthwise_conv1d():
    # FLA's ShortConvolution is an nn.Conv1d(D, D, W, groups=D, padding=W-1): its state dict loads unchanged
    ref = nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=True)
    conv = make(6, 4)
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 6)
    conv.activation = None
    with torch.no_grad():
        y, _ = conv(x)
        want = ref(x.transpose(1, 2))[..., :9].transpose(1, 2)   # the usual causal conv: pad, keep the first T
    assert_close('y', want, y, 1e-5, err_atol=0)
    assert conv.state_size == 24 and conv.padding == (3,) and conv.groups == 6


def test_deprecated_kwarg_warns():
    with pytest.warns(UserWarning, match='use_fast_conv1d'):
        ShortConvolution(4, 3, use_fast_conv1d=True)


@pytest.mark.parametrize('call, msg', [
    (lambda c: c(torch.randn(2, 5)), '`x`'),
    (lambda c: c(torch.randn(2, 5, 4), cache=torch.randn(2, 4, 2)), '`cache`'),
    (lambda c: c(torch.randn(2, 5, 4), cache=torch.randn(3, 4, 3)), '`cache`'),
    (lambda c: c(torch.randn(1, 5, 4), cache=torch.randn(1, 4, 3), cu_seqlens=torch.tensor([0, 2, 5])), '`cache`'),
    (lambda c: c(torch.randn(1, 5, 4), mask=torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5])), '`mask`'),
    (lambda c: c(torch.randn(2, 5, 4), mask=torch.ones(2, 4)), '`mask`'),
    (lambda c: c(torch.randn(2, 5, 4), cu_seqlens=torch.tensor([0, 2, 5])), 'batch size'),
    (lambda c: c(torch.randn(1, 5, 4), cu_seqlens=torch.tensor([0., 5.])), 'cu_seqlens'),
    (lambda c: c(torch.randn(1, 5, 4), cu_seqlens=torch.tensor([0, 4])), 'cu_seqlens'),
    (lambda c: c(torch.randn(1, 5, 4), cu_seqlens=torch.tensor([0, 3, 2, 5])), 'cu_seqlens'),
    (lambda c: c(torch.randn(2, 5, 4), residual=torch.randn(2, 4, 4)), '`residual`'),
    (lambda c: c(torch.randn(2, 5, 3)), '`x`'),
    (lambda c: causal_conv1d(torch.randn(2, 5, 4), torch.randn(3, 3)), '`weight`'),
    (lambda c: causal_conv1d(torch.randn(2, 5, 4), torch.randn(4, 3), activation='relu'), '`activation`'),
    (lambda c: causal_conv1d_update(torch.randn(2, 1, 4), torch.randn(2, 4, 2), weight=torch.randn(4, 3)), '`cache`'),
])
def test_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg):
        call(make(4, 3))


def test_bad_construction():
    with pytest.raises(AssertionError, match='relu'):
        ShortConvolution(4, 3, activation='relu')
    with pytest.raises(ValueError, match='backend'):
        ShortConvolution(4, 3, backend='mix')
    assert ShortConvolution(4, 3, backend='cuda').backend == 'cuda'
