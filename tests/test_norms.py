"""RMSNorm, FusedRMSNormGated, FusedLayerNormGated: FLA's test matrix (spec 9.4) at CPU size against float64
nn.RMSNorm / nn.LayerNorm, the residual stream (prenorm, residual_in_fp32), properties, bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from myfla_gla import (FusedLayerNormGated, FusedRMSNormGated, RMSNorm, assert_close, layer_norm_gated, rms_norm,
                       rms_norm_gated)

RATIO = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def reference(x, g, weight, bias, activation, residual, eps, is_rms_norm):
    D = x.shape[-1]
    z = x.double() + (0 if residual is None else residual.double())
    norm = (nn.RMSNorm if is_rms_norm else nn.LayerNorm)(D, eps=eps, elementwise_affine=False)
    y = norm(z) * (1 if weight is None else weight.double()) + (0 if bias is None else bias.double())
    if g is not None:
        g = g.double().reshape(z.shape)
        y = y * (F.silu(g) if activation in ('swish', 'silu') else torch.sigmoid(g))
    return y, z


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def check(module, x, g, residual, gated, is_rms_norm, prenorm=True):
    dtype = x.dtype
    out = module(x, g, residual, prenorm=prenorm) if gated else module(x, residual, prenorm=prenorm)
    y, res = out if prenorm else (out, None)
    y_ref, z_ref = reference(x, g, module.weight, module.bias, getattr(module, 'activation', None), residual,
                             module.eps, is_rms_norm)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close('y', y_ref, y, RATIO[dtype], err_atol=0)
    dy, dz = torch.randn(x.shape, dtype=dtype).double(), torch.randn(x.shape, dtype=dtype).double()
    inputs = [t for t in (x, g, residual, module.weight, module.bias) if t is not None and t.requires_grad]
    loss = lambda a, b: (a.double() * dy).sum() + (0 if b is None else (b.double() * dz).sum())
    got = torch.autograd.grad(loss(y, res), inputs)
    want = torch.autograd.grad(loss(y_ref, z_ref if prenorm else None), inputs)
    for a, b in zip(want, got):
        assert_close('grad', a, b, RATIO[dtype], err_atol=0)
    return res, z_ref


# FLA's test_rmsnorm / test_rmsnorm_gated / test_layernorm_gated shapes, shortened; eps = 0 as there, and 1e-5
@pytest.mark.parametrize('T, D', [(1, 64), (7, 50), (16, 128), (5, 256)])
@pytest.mark.parametrize('eps', [0., 1e-5])
@pytest.mark.parametrize('residual', [False, True])
def test_rmsnorm(T, D, eps, residual):
    x = torch.randn(2, 2, T, D, requires_grad=True)
    r = torch.randn(2, 2, T, D, requires_grad=True) if residual else None
    check(randomise(RMSNorm(D, bias=True, eps=eps)), x, None, r, False, True)
    check(randomise(RMSNorm(D, eps=eps)), x, None, r, False, True, prenorm=False)


@pytest.mark.parametrize('T, D, activation', [(1, 64, 'silu'), (33, 128, 'sigmoid'), (9, 200, 'swish'),
                                              (50, 50, 'sigmoid')])
@pytest.mark.parametrize('eps', [0., 1e-5])
@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('is_rms_norm', [True, False])
def test_gated(T, D, activation, eps, residual, is_rms_norm):
    x, g = torch.randn(2, 2, T, D, requires_grad=True), torch.randn(2, 2, T, D, requires_grad=True)
    r = torch.randn(2, 2, T, D, requires_grad=True) if residual else None
    m = FusedRMSNormGated(D, eps=eps, activation=activation) if is_rms_norm else \
        FusedLayerNormGated(D, bias=True, activation=activation, eps=eps)
    check(randomise(m), x, g, r, True, is_rms_norm)


@pytest.mark.parametrize('cls', [FusedRMSNormGated, FusedLayerNormGated])
@pytest.mark.parametrize('affine', [False, None])
def test_without_affine(cls, affine):
    m = cls(32, elementwise_affine=affine)
    assert m.weight is None and m.bias is None and list(m.state_dict()) == []
    x, g = torch.randn(3, 32, requires_grad=True), torch.randn(3, 32, requires_grad=True)
    check(m, x, g, None, True, cls is FusedRMSNormGated)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('param_dtype', [torch.float32, 'same'])
def test_half_precision(dtype, param_dtype):
    param_dtype = dtype if param_dtype == 'same' else param_dtype
    x, g, r = (torch.randn(4, 9, 48, dtype=dtype, requires_grad=True) for _ in range(3))
    check(randomise(FusedRMSNormGated(48, dtype=param_dtype)), x, g, r, True, True)
    check(randomise(RMSNorm(48, dtype=param_dtype)), x, None, r, False, True)


def test_gate_with_another_shape():
    # FLA flattens x and g to [-1, D] separately: a gate with the same elements in another shape is accepted
    x, g = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 32, dtype=torch.float64)
    y = rms_norm_gated(x, g, None, None, eps=1e-5)
    assert_close('y', reference(x, g, None, None, 'swish', None, 1e-5, True)[0], y, 1e-12, err_atol=0)
    with pytest.raises(ValueError, match='`g`'):
        rms_norm_gated(x, g[..., :8], None, None)


def test_residual_stream_dtypes():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for module in (RMSNorm(16), FusedRMSNormGated(16)):
        call = (lambda *a, **k: module(*a, **k)) if isinstance(module, RMSNorm) else \
            (lambda x_, *a, **k: module(x_, torch.randn_like(x_), *a, **k))
        # a residual: the sum in the residual's dtype, residual_in_fp32 ignored
        for r_dtype in (torch.float32, torch.bfloat16):
            r = torch.randn(4, 16, dtype=r_dtype)
            for fp32 in (False, True):
                _, res = call(x, r, prenorm=True, residual_in_fp32=fp32)
                assert res.dtype == r_dtype
                assert_close('res', x.double() + r.double(), res, 5e-3, err_atol=0)
        _, res = call(x, prenorm=True, residual_in_fp32=True)
        assert res.dtype == torch.float32 and torch.equal(res, x.float())
        _, res = call(x, prenorm=True)
        assert res is x
        assert not isinstance(call(x), tuple)


def test_functional_defaults_and_reprs():
    import inspect
    assert inspect.signature(rms_norm_gated).parameters['eps'].default == 1e-6
    assert inspect.signature(layer_norm_gated).parameters['eps'].default == 1e-6
    assert inspect.signature(rms_norm).parameters['eps'].default == 1e-5
    assert FusedRMSNormGated(8).eps == RMSNorm(8).eps == FusedLayerNormGated(8).eps == 1e-5
    assert repr(RMSNorm(8)) == 'RMSNorm(8, eps=1e-05)'
    assert repr(FusedLayerNormGated(8, elementwise_affine=False, activation='sigmoid')) == \
        'FusedLayerNormGated(8, elementwise_affine=False, eps=1e-05, activation=sigmoid)'
    assert list(inspect.signature(FusedLayerNormGated).parameters)[:5] == \
        ['hidden_size', 'elementwise_affine', 'bias', 'activation', 'eps']
    assert list(inspect.signature(FusedRMSNormGated).parameters)[:4] == \
        ['hidden_size', 'elementwise_affine', 'eps', 'activation']


def test_reset_parameters_and_state_dict():
    m = randomise(RMSNorm(8, bias=True))
    m.reset_parameters()
    assert m.weight.eq(1).all() and m.bias.eq(0).all()
    fla_like = {'weight': torch.randn(8)}
    n = FusedRMSNormGated(8)
    n.load_state_dict(fla_like)
    assert torch.equal(n.weight, fla_like['weight'])
    m = FusedRMSNormGated(8, dtype=torch.bfloat16, device='cpu')
    assert m.weight.dtype == torch.bfloat16


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.01, 100.), st.sampled_from(['swish', 'sigmoid']))
def test_properties(D, scale, activation):
    # eps = 0: RMSNorm is scale invariant and gives unit RMS; LayerNorm output has zero mean
    x = torch.randn(5, D, dtype=torch.float64) + 0.1
    y = rms_norm(x, None, None, eps=0.)
    assert_close('scale', y, rms_norm(scale * x, None, None, eps=0.), 1e-12, err_atol=0)
    assert torch.allclose(y.square().mean(-1), torch.ones(5, dtype=torch.float64))
    if D > 1:
        ln = layer_norm_gated(x, torch.full_like(x, 50.), None, None, 'sigmoid', eps=0.)
        assert ln.mean(-1).abs().max() < 1e-10
    g = torch.randn(5, D, dtype=torch.float64)
    gate = F.silu(g) if activation == 'swish' else torch.sigmoid(g)
    assert_close('gate', y * gate, rms_norm_gated(x, g, None, None, activation, eps=0.), 1e-12, err_atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match='Unsupported activation: relu'):
        FusedRMSNormGated(8, activation='relu')
    with pytest.raises(ValueError, match='Unsupported activation: tanh'):
        FusedLayerNormGated(8, activation='tanh')
    with pytest.raises(ValueError, match='Unsupported activation'):
        rms_norm_gated(torch.randn(2, 8), torch.randn(2, 8), None, None, activation='gelu')
    with pytest.raises(AssertionError, match='`residual`'):
        RMSNorm(8)(torch.randn(2, 8), torch.randn(1, 8))
    with pytest.raises(AssertionError, match='`weight`'):
        rms_norm(torch.randn(2, 8), torch.ones(4), None)
    with pytest.raises(AssertionError, match='`bias`'):
        layer_norm_gated(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), torch.ones(3))
