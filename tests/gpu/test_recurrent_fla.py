"""FLA parity of fused_recurrent_gla on CUDA: FLA's own test matrices (tests/ops/test_gla.py, spec 9.2) at FLA's
sizes, plus what they leave out (value gate, reverse, scale), comparing outputs, final states and every gradient
with FLA's Triton `fused_recurrent_gla` (at FLA's tolerance, 0.005) and both with the float64 reference.
Skipped unless CUDA and FLA (fla-core 0.6.0) are available."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)
fla_gla = pytest.importorskip('fla.ops.gla')

from myfla_gla import DEFAULT_RATIO, assert_close, fused_recurrent_gla, get_err_ratio, random_gla_inputs, \
    reference_recurrent_gla  # noqa: E402

NAMES = ('o', 'ht', 'dq', 'dk', 'dv', 'dgk', 'dgv', 'dh0')
device = 'cuda'


def run(op, inputs, do, dht, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, gk, gv, h0 = leaves
    o, ht = op(q, k, v, gk, gv, initial_state=h0, output_final_state=True, **kw)
    ((o * do.to(o.dtype)).sum() + (ht * dht.to(ht.dtype)).sum()).backward()
    return dict(zip(NAMES, [o, ht] + [None if x is None else x.grad for x in leaves]))


def make(B, T, H, K, V=None, norm=1., dtype=torch.float32, use_gv=False, N=None, state_v_first=False):
    "FLA's test inputs, generated on the CPU (same numbers on every machine) and moved to CUDA."
    V, N = V or K, N or B
    q, k, v, gk = random_gla_inputs(B, T, H, K, V, gate_logit_normalizer=norm, dtype=dtype, device=device)
    gv = random_gla_inputs(B, T, H, V, gate_logit_normalizer=norm, dtype=dtype, device=device)[3] if use_gv else None
    shape = (N, H, V, K) if state_v_first else (N, H, K, V)
    h0 = torch.rand(shape, device=device)
    return (q, k, v, gk, gv, h0), torch.randn(B, T, H, V, dtype=dtype, device=device), torch.randn(shape, device=device)


def check(inputs, do, dht, with_reference=True, **kw):
    "Ours vs FLA at 0.005 (FLA's test bound); ours vs the float64 reference at DEFAULT_RATIO; print all errors."
    got = run(fused_recurrent_gla, inputs, do, dht, **kw)
    tri = run(fla_gla.fused_recurrent_gla, inputs, do, dht, **kw)
    ref = None
    if with_reference:
        ref = run(reference_recurrent_gla, [None if x is None else x.double() for x in inputs], do.double(),
                  dht.double(), **kw)
    line = []
    for n in NAMES:
        if got[n] is None:
            assert tri[n] is None, n
            continue
        assert_close(f'{n} vs FLA', tri[n], got[n], 0.005)
        msg = f'{n}: vs FLA {get_err_ratio(tri[n], got[n]):.1e}'
        if ref is not None:
            assert_close(f'{n} vs reference', ref[n], got[n], DEFAULT_RATIO[got[n].dtype])
            msg += f', ours {get_err_ratio(ref[n], got[n]):.1e}, FLA {get_err_ratio(ref[n], tri[n]):.1e}'
        line.append(msg)
    print(' | '.join(line))


@pytest.mark.parametrize('B, T, H, D, norm, dtype', [
    (1, 63, 1, 64, 1, torch.float32),
    (2, 1024, 4, 60, 1, torch.float32),
    (2, 1024, 8, 128, 0.1, torch.float32),
    (2, 1024, 8, 128, 1, torch.float32),
    (2, 1024, 8, 128, 10, torch.float32),
    (4, 2048, 8, 64, 1, torch.float32),
    (2, 1024, 8, 128, 0.1, torch.float16),
    (2, 1024, 8, 128, 10, torch.float16),
])
def test_fused_recurrent(B, T, H, D, norm, dtype):
    check(*make(B, T, H, D, norm=norm, dtype=dtype))


@pytest.mark.parametrize('B, T, H, D, dtype', [(2, 256, 4, 64, torch.float32), (2, 1024, 4, 128, torch.float16)])
def test_fused_recurrent_state_v_first(B, T, H, D, dtype):
    check(*make(B, T, H, D, dtype=dtype, state_v_first=True), state_v_first=True)


@pytest.mark.parametrize('H, D, cu, dtype', [
    (4, 64, [0, 15], torch.float32),
    (4, 64, [0, 256, 500, 1000], torch.float32),
    (4, 100, [0, 15, 100, 300, 1200, 2000], torch.float32),
    (4, 64, [0, 1, 100, 300, 1200, 2048], torch.float16),
    (4, 128, [0, 200, 512, 1200, 2048], torch.float16),
    (4, 64, [0, 0, 16, 16, 40], torch.float32),
])
def test_fused_recurrent_varlen(H, D, cu, dtype):
    inputs, do, dht = make(1, cu[-1], H, D, dtype=dtype, N=len(cu) - 1)
    check(inputs, do, dht, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))


@pytest.mark.parametrize('opts, kw', [
    (dict(use_gv=True), {}),
    (dict(use_gv=True, norm=0.1), dict(reverse=True)),
    (dict(), dict(reverse=True, scale=0.3)),
    (dict(use_gv=True, state_v_first=True), dict(state_v_first=True, reverse=True)),
    (dict(dtype=torch.bfloat16), {}),
    (dict(T=1, use_gv=True), {}),
])
def test_beyond_fla_tests(opts, kw):
    opts = dict(opts)
    T = opts.pop('T', 300)
    check(*make(2, T, 4, 64, V=32, **opts), **kw)


def test_varlen_reverse_gv():
    cu = [0, 7, 7, 300, 500]
    inputs, do, dht = make(1, cu[-1], 4, 32, use_gv=True, N=len(cu) - 1)
    check(inputs, do, dht, reverse=True, cu_seqlens=torch.tensor(cu, dtype=torch.int64, device=device))
