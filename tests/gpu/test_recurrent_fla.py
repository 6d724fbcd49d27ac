"""FLA parity of fused_recurrent_gla on CUDA: the cases of FLA's own test matrices (tests/ops/test_gla.py, spec 9.2)
once each, at up to 600 tokens (FLA's 1024-2048 add run time, not cases), plus what they leave out (value gate,
reverse, scale, bfloat16, one token, empty sequences), comparing outputs, final states and every gradient with FLA's
Triton `fused_recurrent_gla` (at FLA's tolerance, 0.005) and both with the float64 reference.
Skipped unless CUDA and FLA (fla-core 0.6.0) are available."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)
fla_gla = pytest.importorskip('fla.ops.gla')

from myfla_gla import DEFAULT_RATIO, fused_recurrent_gla, get_err_ratio  # noqa: E402
from myfla_gla.testing import compare, compare_op, op_inputs, run_op, run_reference  # noqa: E402

device = 'cuda'


def make(B, T, H, K, V=None, norm=1., dtype=torch.float32, use_gv=False, cu=None):
    "FLA's test inputs, drawn by the CPU generator (same numbers on every machine) and moved to CUDA."
    return op_inputs(device, dtype, B, T, H, K, V or K, norm, cu_seqlens=cu, gv=use_gv)


def check(x, **kw):
    "Ours vs the float64 reference at DEFAULT_RATIO; ours vs FLA at 0.005 (FLA's test bound); print all errors."
    ref = run_reference(x, **kw)
    errs, got = compare_op(fused_recurrent_gla, x, 'gk', DEFAULT_RATIO, reference=ref, **kw)
    tri = run_op(fla_gla.fused_recurrent_gla, x, 'gk', **kw)
    vs_fla = {n: get_err_ratio(tri[n], got[n]) for n in errs}
    print(' | '.join(f'{n}: vs FLA {vs_fla[n]:.1e}, ours {errs[n]:.1e}, FLA {get_err_ratio(ref[n], tri[n]):.1e}'
                     for n in errs))
    ok, _, _, msgs = compare({n: (tri[n], got[n]) for n in errs}, 0.005)   # ours computed once, against both
    assert ok, msgs


# The float32 and float16 kernels at head sizes 64, 60, 100 and 128, strong and weak decays: one case each
@pytest.mark.parametrize('B, T, H, D, norm, dtype', [
    (1, 63, 1, 64, 1, torch.float32),
    (2, 300, 4, 60, 1, torch.float32),
    (2, 300, 4, 128, 0.1, torch.float32),
    (2, 300, 4, 128, 10, torch.float32),
    (2, 300, 4, 128, 0.1, torch.float16),
    (2, 300, 4, 128, 10, torch.float16),
])
def test_fused_recurrent(B, T, H, D, norm, dtype):
    check(make(B, T, H, D, norm=norm, dtype=dtype))


@pytest.mark.parametrize('B, T, H, D, dtype', [(2, 256, 4, 64, torch.float32), (2, 300, 4, 128, torch.float16)])
def test_fused_recurrent_state_v_first(B, T, H, D, dtype):
    check(make(B, T, H, D, dtype=dtype), state_v_first=True)


@pytest.mark.parametrize('H, D, cu, dtype', [
    (4, 64, [0, 15], torch.float32),
    (4, 100, [0, 15, 100, 300, 600], torch.float32),
    (4, 64, [0, 1, 100, 300, 600], torch.float16),
    (4, 64, [0, 0, 16, 16, 40], torch.float32),
])
def test_fused_recurrent_varlen(H, D, cu, dtype):
    check(make(1, cu[-1], H, D, dtype=dtype, cu=cu), cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))


@pytest.mark.parametrize('opts, kw', [
    (dict(use_gv=True), {}),
    (dict(use_gv=True, norm=0.1), dict(reverse=True)),
    (dict(), dict(reverse=True, scale=0.3)),
    (dict(use_gv=True), dict(state_v_first=True, reverse=True)),
    (dict(dtype=torch.bfloat16), {}),
    (dict(T=1, use_gv=True), {}),
])
def test_beyond_fla_tests(opts, kw):
    opts = dict(opts)
    T = opts.pop('T', 300)
    check(make(2, T, 4, 64, V=32, **opts), **kw)


def test_varlen_reverse_gv():
    cu = [0, 7, 7, 300, 500]
    check(make(1, cu[-1], 4, 32, use_gv=True, cu=cu), reverse=True,
          cu_seqlens=torch.tensor(cu, dtype=torch.int64, device=device))
