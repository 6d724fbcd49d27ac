"""Mixed precision on CUDA: tests/test_autocast.py's checks under `torch.autocast('cuda', bf16 | fp16)`, training
steps in bf16 and in fp16 with `torch.amp.GradScaler`, and the output dtypes against FLA 0.6.0's under autocast.
Skipped without CUDA; the comparison with FLA also without FLA.

The criteria are the CPU file's: an op under autocast gives its float32 result on the same rounded inputs, rounded
once to the output's dtype (within one unit at every element); a layer or the model stays within 5 times the
error that rounding its weights and inputs alone makes in float32."""
import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)

from test_autocast import (MODULES, OPS, _layer, _layer_grads, _model_grads, _prefill_and_decode, _rand,  # noqa: E402
                           _tiny_model, check_near_float32, check_training, gla_inputs, run, train_and_generate,
                           within_rounding)

from myfla_gla import get_err_ratio  # noqa: E402

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize('half', HALF, ids=str)
@pytest.mark.parametrize('op', list(OPS))
@pytest.mark.parametrize('gate', ['float32', 'half'])
def test_ops_under_cuda_autocast(op, half, gate):
    fn, o_like = OPS[op]
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 200, 2, 32, 32
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, half, half if gate == 'half' else torch.float32, gen, 'cuda')
    cot = [_rand(B, T, H, V, dtype=half, gen=gen).float().cuda(), torch.randn(B, H, K, V, generator=gen).cuda()]
    inside = op != 'naive_recurrent_gla'   # plain PyTorch: a backward inside autocast is autocast too
    outs, grads, ins = run(fn, (q, k, v, g, h0), range(5), cot, half, inside, device='cuda')
    ref_outs, ref_grads, _ = run(fn, [x.float() for x in (q, k, v, g, h0)], range(5), cot, device='cuda')
    assert (outs[0].dtype, outs[1].dtype) == ({'q': q.dtype, 'v': v.dtype}[o_like], torch.float32)
    assert [gr.dtype for gr in grads] == [x.dtype for x in ins]
    for name, ref, x in zip(['o', 'ht', 'dq', 'dk', 'dv', 'dg', 'dh0'], ref_outs + list(ref_grads), outs + list(grads)):
        within_rounding(f'{op} {name} ({half}, gate {gate})', ref, x)
        print(f'{op:20s} {str(half)[6:]:9s} gate {gate:7s} {name:3s} rel. RMS error vs float32 {get_err_ratio(ref, x):.1e}')


@pytest.mark.parametrize('half', HALF, ids=str)
@pytest.mark.parametrize('name', list(MODULES))
def test_modules_under_cuda_autocast(name, half):
    make, inputs = MODULES[name]
    torch.manual_seed(0)
    m = make().cuda()
    xs = [x.cuda() for x in inputs(torch.Generator().manual_seed(1), half)]
    fn = (lambda *a: (m(a[0], residual=a[-1])[0],)) if name == 'ShortConvolution' else (lambda *a: (m(*a),))
    cot = [torch.randn(xs[0].shape).to(half).float().cuda()]
    params = list(m.parameters())
    outs, grads, _ = run(fn, xs, range(len(xs)), cot, half, params=params, device='cuda')
    ref_outs, ref_grads, _ = run(fn, [x.float() for x in xs], range(len(xs)), cot, params=params, device='cuda')
    assert outs[0].dtype == half
    for ref, x in zip(ref_outs + list(ref_grads), outs + list(grads)):
        within_rounding(f'{name} ({half})', ref, x)


@pytest.mark.parametrize('half', HALF, ids=str)
@pytest.mark.parametrize('mode', ['chunk', 'fused_chunk', 'fused_recurrent'])
@pytest.mark.parametrize('conv', [False, True])
@pytest.mark.parametrize('T', [20, 200])
def test_layer_modes_under_cuda_autocast(mode, conv, T, half):
    gen = torch.Generator().manual_seed(T)
    x, dy = torch.randn(2, T, 32, generator=gen).cuda(), torch.randn(2, T, 32, generator=gen).cuda()
    y, dx = check_near_float32(f'{mode} conv={conv} T={T} {half}', functools.partial(_layer_grads, half=half),
                               _layer(mode, conv).cuda(), x, dy, half=half)[:2]
    assert (y.dtype, dx.dtype) == (half, torch.float32)


@pytest.mark.parametrize('half', HALF, ids=str)
def test_layer_decodes_under_cuda_autocast(half):
    out = check_near_float32(f'decoding {half}', functools.partial(_prefill_and_decode, half=half),
                             _layer('chunk', True).cuda().eval(), torch.randn(2, 73, 32).cuda(), half=half)
    assert out[1].dtype == torch.float32


def test_model_under_cuda_autocast_bf16():
    ids = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(0)).cuda()
    loss, logits = check_near_float32('model bf16', _model_grads, _tiny_model().cuda(), ids)[:2]
    assert (logits.dtype, loss.dtype) == (torch.bfloat16, torch.float32)


def test_model_under_cuda_autocast_fp16():
    """fp16: loss and logits near float32's. Not every gradient: this tiny model's gradients span more than fp16's
    range (measured on the CPU: at a loss scale of 2**16 those of the attention branches, about 1e-7, lose half their
    digits to underflow; at 2**18 the embedding's overflow), which is what `GradScaler` trades off in training."""
    ids = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(0)).cuda()
    forward = lambda model, ids, amp: _model_grads(model, ids, amp, torch.float16, 2. ** 16)[:2]
    loss, logits = check_near_float32('model fp16', forward, _tiny_model().cuda(), ids, half=torch.float16)
    assert (logits.dtype, loss.dtype) == (torch.float16, torch.float32)


def test_model_trains_and_generates_bf16():
    check_training(*train_and_generate('cuda', torch.bfloat16))


def test_model_trains_and_generates_fp16_with_grad_scaler():
    "fp16 autocast with `torch.amp.GradScaler`: the loss falls, no step's gradients stay non-finite."
    scaler = torch.amp.GradScaler('cuda')
    check_training(*train_and_generate('cuda', torch.float16, scaler))
    assert torch.isfinite(torch.tensor(scaler.get_scale())) and scaler.get_scale() > 0


@pytest.mark.parametrize('half', HALF, ids=str)
def test_output_dtypes_match_fla_under_autocast(half):
    "FLA's chunk_gla and fused_recurrent_gla under the same autocast and inputs: the same dtypes, values within 1e-2."
    pytest.importorskip('fla')
    from fla.ops.gla import chunk_gla as fla_chunk, fused_recurrent_gla as fla_recurrent
    from myfla_gla import chunk_gla, fused_recurrent_gla
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, h0 = gla_inputs(2, 200, 2, 64, 64, half, torch.float32, gen, 'cuda')
    cot = [_rand(2, 200, 2, 64, dtype=half, gen=gen).float().cuda(), torch.randn(2, 2, 64, 64, generator=gen).cuda()]
    for ours, theirs, gate in ((chunk_gla, fla_chunk, 'g'), (fused_recurrent_gla, fla_recurrent, 'gk')):
        call = lambda op: (lambda q, k, v, g, h0: op(q, k, v, **{gate: g}, initial_state=h0, output_final_state=True))
        a_out, a_grads, _ = run(call(ours), (q, k, v, g, h0), range(5), cot, half, device='cuda')
        b_out, b_grads, _ = run(call(theirs), (q, k, v, g, h0), range(5), cot, half, device='cuda')
        for name, a, b in zip(['o', 'ht', 'dq', 'dk', 'dv', 'dg', 'dh0'], a_out + list(a_grads), b_out + list(b_grads)):
            assert a.dtype == b.dtype, (ours.__name__, name, a.dtype, b.dtype)
            assert get_err_ratio(b.float(), a.float()) <= 1e-2, (ours.__name__, name)
