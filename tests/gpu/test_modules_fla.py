"""FLA parity on CUDA for ShortConvolution, RMSNorm, FusedRMSNormGated and FusedLayerNormGated: FLA's modules
with the same weights (load_state_dict), the same inputs, outputs, new caches / residual streams and every
gradient. Skipped unless CUDA is available and FLA (0.6.0) is importable.

Bounds are the project's DEFAULT_RATIO (float32 1e-5, half 5e-3): both sides compute in float32 and round once.

Each module's options are crossed pairwise (`matrix.pairwise`: every pair of levels of any two options appears in
some case), not in full: every combination is a new set of FLA kernels to compile, which is most of the time here."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)
pytest.importorskip('fla')

from fla.modules import FusedLayerNormGated as FLAFusedLayerNormGated  # noqa: E402
from fla.modules import FusedRMSNormGated as FLAFusedRMSNormGated  # noqa: E402
from fla.modules import RMSNorm as FLARMSNorm  # noqa: E402
from fla.modules import ShortConvolution as FLAShortConvolution  # noqa: E402

from matrix import pairwise  # noqa: E402
from myfla_gla import (DEFAULT_RATIO, FusedLayerNormGated, FusedRMSNormGated, RMSNorm, ShortConvolution,  # noqa: E402
                       assert_close)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pair_of_convs(D, W, bias, activation, dtype):
    ours = ShortConvolution(D, W, bias=bias, activation=activation, device='cuda', dtype=dtype)
    fla = FLAShortConvolution(D, W, bias=bias, activation=activation, device='cuda', dtype=dtype)
    fla.load_state_dict(ours.state_dict())
    return ours, fla


def run_conv(conv, x, r, h0, cu, dy, dh):
    inputs = [t for t in (x, r, h0, conv.weight, conv.bias) if t is not None]
    y, final = conv(x, residual=r, cache=h0, output_final_state=True, cu_seqlens=cu)
    loss = (y.float() * dy).sum() + (final.float() * dh).sum()
    return [y, final, *torch.autograd.grad(loss, inputs)]


def ids(case):
    return '-'.join(str(v).replace('torch.', '') for v in case.values())


CONV_CASES = pairwise({'dtype': DTYPES, 'W': [2, 3, 4], 'layout': ['dense', 'varlen'],
                       'extras': [False, True],   # bias, residual and initial cache all off / all on
                       'activation': ['silu', None]})


@pytest.mark.parametrize('case', CONV_CASES, ids=ids)
def test_short_convolution_matches_fla(case):
    dtype, W, layout, extras, activation = case.values()
    torch.manual_seed(0)
    D = 256
    if layout == 'dense':
        B, T, cu = 2, 300, None
    else:
        B, T = 1, 500
        cu = torch.tensor([0, 3, 3, 120, 121, 500], device='cuda', dtype=torch.int32)  # empty and short sequences
    N = B if cu is None else len(cu) - 1
    ours, fla = pair_of_convs(D, W, extras, activation, dtype)
    mk = lambda *s: torch.randn(*s, device='cuda', dtype=dtype).requires_grad_()
    x, r, h0 = mk(B, T, D), (mk(B, T, D) if extras else None), (mk(N, D, W) if extras else None)
    dy, dh = torch.randn(B, T, D, device='cuda').to(dtype).float(), torch.randn(N, D, W, device='cuda').to(dtype).float()
    dh[..., 0] = 0  # FLA drops the gradient of final-state slot 0 (test_final_state_slot_0_gradient)
    got, want = run_conv(ours, x, r, h0, cu, dy, dh), run_conv(fla, x, r, h0, cu, dy, dh)
    names = ['y', 'final', 'dx'] + (['dr', 'dh0'] if extras else []) + ['dw'] + (['db'] if extras else [])
    for name, a, b in zip(names, want, got):
        assert a.dtype == b.dtype, name
        assert_close(f'{layout} {name}', a, b, DEFAULT_RATIO[dtype], err_atol=0)


@pytest.mark.parametrize('W', [2, 4])
def test_final_state_slot_0_gradient(W):
    """FLA 0.6.0's backward adds the final state's gradient to tokens T-W+1 .. T-1 only, although slot 0 holds
    token T-W (spec 2.4): a loss on `final_state[..., 0]` gives x no gradient there. Ours gives it (gradcheck on
    CPU). Harmless when the state only feeds the next call, which never reads slot 0."""
    torch.manual_seed(0)
    ours, fla = pair_of_convs(8, W, False, None, torch.float32)
    x = torch.randn(1, 10, 8, device='cuda', requires_grad=True)
    for who, conv in (('ours', ours), ('fla', fla)):
        _, final = conv(x, output_final_state=True)
        (dx,) = torch.autograd.grad(final[..., 0].sum(), x)
        assert torch.equal(final[0, :, 0], x[0, 10 - W].detach())
        want = 1. if who == 'ours' else 0.   # FLA: the bug
        assert torch.equal(dx[0, 10 - W], torch.full((8,), want, device='cuda')), who
        assert dx.abs().sum() == dx[0, 10 - W].abs().sum(), who


@pytest.mark.parametrize('case', pairwise({'dtype': DTYPES, 'W': [2, 4], 'packed': [False, True]}), ids=ids)
def test_decoding_matches_fla(case):
    dtype, W, packed = case.values()
    # prefill 20 tokens, then 8 single-token steps; both sides write the cache in place
    torch.manual_seed(0)
    N, D = 3, 128
    ours, fla = pair_of_convs(D, W, True, 'silu', dtype)
    x, r = torch.randn(N, 28, D, device='cuda', dtype=dtype), torch.randn(N, 28, D, device='cuda', dtype=dtype)
    with torch.no_grad():
        _, c = ours(x[:, :20], residual=r[:, :20], output_final_state=True)
        _, c_f = fla(x[:, :20], residual=r[:, :20], output_final_state=True)
        assert_close('prefill cache', c_f, c, 0, err_atol=0)
        cu = torch.arange(N + 1, device='cuda', dtype=torch.int32) if packed else None
        for t in range(20, 28):
            xt, rt = x[:, t:t + 1], r[:, t:t + 1]
            if packed:
                xt, rt = xt.transpose(0, 1), rt.transpose(0, 1)
            y, _ = ours(xt, residual=rt, cache=c, cu_seqlens=cu)
            y_f, _ = fla(xt, residual=rt, cache=c_f, cu_seqlens=cu)
            assert_close(f'step {t} y', y_f, y, DEFAULT_RATIO[dtype], err_atol=0)
            assert_close(f'step {t} cache', c_f, c, 0, err_atol=0)


NORMS = [('RMSNorm', RMSNorm, FLARMSNorm, {'bias': True}, False),
         ('FusedRMSNormGated', FusedRMSNormGated, FLAFusedRMSNormGated, {}, True),
         ('FusedLayerNormGated', FusedLayerNormGated, FLAFusedLayerNormGated, {'bias': True}, True)]


# Crossed pairwise together (RMSNorm has no gate: its cases ignore the activation). D: one size below FLA's switch
# of kernels at 512 (not a power of two) and one above.
NORM_CASES = [dict(c, activation=c['activation'] if c['norm'] != 'RMSNorm' else 'none')
              for c in pairwise({'norm': [n[0] for n in NORMS], 'dtype': DTYPES, 'D': [200, 1024],
                                 'residual': [False, True], 'activation': ['swish', 'silu', 'sigmoid']})]
NORM_CASES = [dict(t) for t in dict.fromkeys(tuple(c.items()) for c in NORM_CASES)]   # RMSNorm's duplicates


@pytest.mark.parametrize('case', NORM_CASES, ids=ids)
def test_norms_match_fla(case):
    norm, dtype, D, residual, activation = case.values()
    name, ours_cls, fla_cls, kw, gated = next(n for n in NORMS if n[0] == norm)
    torch.manual_seed(0)
    kw = dict(kw, activation=activation) if gated else kw
    ours = ours_cls(D, **kw).to(device='cuda', dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p))
    fla = fla_cls(D, **kw).to(device='cuda', dtype=dtype)
    fla.load_state_dict(ours.state_dict())
    mk = lambda: torch.randn(2, 3, 37, D, device='cuda', dtype=dtype).requires_grad_()
    x, g, r = mk(), (mk() if gated else None), (mk() if residual else None)
    dy, dz = torch.randn_like(x).detach(), torch.randn_like(x).detach()
    outs = {}
    for who, mod in (('ours', ours), ('fla', fla)):
        y, res = mod(x, g, r, prenorm=True) if gated else mod(x, r, prenorm=True)
        inputs = [t for t in (x, g, r, mod.weight, mod.bias) if t is not None]
        outs[who] = [y, res, *torch.autograd.grad((y.float() * dy).sum() + (res.float() * dz).sum(), inputs)]
    for i, (a, b) in enumerate(zip(outs['fla'], outs['ours'])):
        assert a.dtype == b.dtype, i
        assert_close(f'{name} output {i}', a, b, DEFAULT_RATIO[dtype], err_atol=0)
