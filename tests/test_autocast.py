"""Mixed precision on the CPU: every op, module, layer mode and the model under `torch.autocast('cpu', ...)`.

Autocast hands the ops what a model under autocast makes: bf16 (or fp16) projections and float32 gates. The ops
turn autocast off inside (`myfla_gla.checks.autocast_off`) and compute as they do without it, so under autocast an
op's output and gradients must be its float32 result, on the same half-precision-rounded inputs, rounded once to
the output's dtype: within one unit of the dtype's precision at every element. (Products run in bf16 by autocast
break that bound: `fused_chunk_gla` did, with twice the rounding error.) Output dtypes are FLA's.

The layer and the model run their projections in bf16 under autocast, as FLA's do: there the bound is a relative
RMS error against the float32 run. The CUDA half (bf16, fp16 with `GradScaler`) is tests/gpu/test_autocast_cuda.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings, strategies as st

from myfla_gla import (FusedLayerNormGated, FusedRMSNormGated, GatedLinearAttention, RMSNorm, ShortConvolution,
                       causal_conv1d, causal_conv1d_update, chunk_gla, fused_chunk_gla, fused_recurrent_gla,
                       naive_recurrent_gla)
from myfla_gla.cache import Cache
from myfla_gla.testing import get_err_ratio

HALF = (torch.bfloat16, torch.float16)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _rand(*shape, dtype, gen, scale=1.):
    "Values representable in `dtype`, returned in `dtype`."
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def gla_inputs(B, T, H, K, V, half, gate_dtype, gen, device='cpu'):
    "q, k, v as autocast's projections (half), g (in `gate_dtype`), an initial state (float32)."
    q, k = _rand(B, T, H, K, dtype=half, gen=gen), _rand(B, T, H, K, dtype=half, gen=gen)
    v = _rand(B, T, H, V, dtype=half, gen=gen)
    g = (F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 4).to(gate_dtype)
    h0 = torch.randn(B, H, K, V, generator=gen)
    return tuple(x.to(device) for x in (q, k, v, g, h0))


# op name -> (call(q, k, v, g, h0) -> (o, final state), dtype FLA gives o)
OPS = {
    'chunk_gla': (lambda q, k, v, g, h0: chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True), 'v'),
    'fused_chunk_gla': (lambda q, k, v, g, h0: fused_chunk_gla(q, k, v, g, initial_state=h0,
                                                               output_final_state=True), 'v'),
    'fused_recurrent_gla': (lambda q, k, v, g, h0: fused_recurrent_gla(q, k, v, g, initial_state=h0,
                                                                       output_final_state=True), 'q'),
    'naive_recurrent_gla': (lambda q, k, v, g, h0: naive_recurrent_gla(q, k, v, g, h0, True), 'q'),
}


def within_rounding(name, ref, x):
    "`x` is `ref` rounded once to x's dtype: at most one unit of x's precision from it, at every element."
    fi = torch.finfo(x.dtype)
    bound = fi.eps * ref.abs() + fi.smallest_normal * fi.eps   # one ulp (and subnormal spacing near 0)
    excess = (x.double() - ref.double()).abs() - bound
    assert excess.max() <= 0, (f"{name}: {int((excess > 0).sum())} of {x.numel()} elements more than one "
                               f"{x.dtype} unit from the float32 result (rel. RMS error {get_err_ratio(ref, x):.1e})")


def run(fn, inputs, grads_of, cotangents, amp_dtype=None, backward_inside=False, params=(), device='cpu'):
    "Outputs of `fn(*inputs)` (under autocast if `amp_dtype`) and the gradients of inputs `grads_of` and `params`."
    inputs = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
    ctx = torch.autocast(device, dtype=amp_dtype) if amp_dtype else torch.autocast(device, enabled=False)
    with ctx:
        outs = [o for o in fn(*inputs) if o is not None]
        loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
        if backward_inside:
            grads = torch.autograd.grad(loss, [inputs[i] for i in grads_of] + list(params))
    if not backward_inside:
        grads = torch.autograd.grad(loss, [inputs[i] for i in grads_of] + list(params))
    return outs, grads, inputs


@pytest.mark.parametrize('op', list(OPS))
@settings(max_examples=4, **SETTINGS)
@given(B=st.integers(1, 2), T=st.integers(1, 70), H=st.integers(1, 2), K=st.sampled_from([4, 8]),
       V=st.sampled_from([4, 6]), half=st.sampled_from(HALF), gate=st.sampled_from(['float32', 'half']),
       inside=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(B=2, T=70, H=2, K=8, V=6, half=torch.bfloat16, gate='float32', inside=True, seed=0)   # two chunks
def test_ops_under_autocast_are_float32_rounded_once(op, B, T, H, K, V, half, gate, inside, seed):
    "Each GLA op under CPU autocast: o, the final state and every gradient, against float32 on the same inputs."
    fn, o_like = OPS[op]
    if op == 'naive_recurrent_gla':
        inside = False   # plain PyTorch: its backward, run inside autocast, would be autocast (see the notes)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, h0 = gla_inputs(B, T, H, K, V, half, half if gate == 'half' else torch.float32, gen)
    # the gradient reaching o is rounded to o's dtype: give one it holds exactly
    cot = [_rand(B, T, H, V, dtype=half, gen=gen).float(), torch.randn(B, H, K, V, generator=gen)]
    outs, grads, ins = run(fn, (q, k, v, g, h0), range(5), cot, half, inside)
    ref_outs, ref_grads, _ = run(fn, [x.float() for x in (q, k, v, g, h0)], range(5), cot)
    want = {'q': q.dtype, 'v': v.dtype}[o_like]
    assert (outs[0].dtype, outs[1].dtype) == (want, torch.float32), op
    for i, (name, x) in enumerate(zip('qkvg', ins)):
        assert grads[i].dtype == x.dtype, (op, name, grads[i].dtype)
    assert grads[4].dtype == torch.float32
    for name, ref, x in zip(['o', 'ht', 'dq', 'dk', 'dv', 'dg', 'dh0'], ref_outs + list(ref_grads), outs + list(grads)):
        within_rounding(f'{op} {name} ({half}, gate {gate}, backward inside: {inside})', ref, x)


def test_varlen_and_decoding_under_autocast():
    "Packed sequences (chunk and recurrent) and one-token decoding steps: float32 rounded once, as above."
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, _ = gla_inputs(1, 40, 2, 8, 4, torch.bfloat16, torch.float32, gen)
    cu = torch.tensor([0, 7, 7, 40])
    h0 = torch.randn(3, 2, 8, 4, generator=gen)
    cot = [_rand(1, 40, 2, 4, dtype=torch.bfloat16, gen=gen).float(), torch.randn(3, 2, 8, 4, generator=gen)]
    for op in (chunk_gla, fused_recurrent_gla):
        fn = lambda q, k, v, g, h0: op(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        outs, grads, _ = run(fn, (q, k, v, g, h0), range(5), cot, torch.bfloat16, backward_inside=True)
        ref_outs, ref_grads, _ = run(fn, [x.float() for x in (q, k, v, g, h0)], range(5), cot)
        for ref, x in zip(ref_outs + list(ref_grads), outs + list(grads)):
            within_rounding(f'{op.__name__} varlen', ref, x)
    # decoding: one token per sequence, the state in the layer's [N, H, V, K] layout
    q1, k1, v1, g1 = (x[:, :3].transpose(0, 1) for x in (q, k, v, g))   # [3, 1, H, D]
    S = torch.randn(3, 2, 4, 8, generator=gen)
    step = lambda *a: fused_recurrent_gla(*a[:4], initial_state=a[4], output_final_state=True, state_v_first=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        o, S1 = step(q1, k1, v1, g1, S)
    ref_o, ref_S1 = step(*(x.float() for x in (q1, k1, v1, g1)), S)
    assert (o.dtype, S1.dtype) == (torch.bfloat16, torch.float32)
    within_rounding('decoding o', ref_o, o)
    within_rounding('decoding state', ref_S1, S1)


# module name -> (module, inputs(gen, half) -> tuple, dtype FLA gives the output: that of input 0)
def _norm_inputs(gated):
    return lambda gen, half: (_rand(2, 5, 16, dtype=half, gen=gen),) + (
        (_rand(2, 5, 16, dtype=half, gen=gen),) if gated else ()) + (_rand(2, 5, 16, dtype=half, gen=gen),)

MODULES = {
    'RMSNorm': (lambda: RMSNorm(16, bias=True), _norm_inputs(False)),
    'FusedRMSNormGated': (lambda: FusedRMSNormGated(16), _norm_inputs(True)),
    'FusedLayerNormGated': (lambda: FusedLayerNormGated(16, bias=True, activation='sigmoid'), _norm_inputs(True)),
    'ShortConvolution': (lambda: ShortConvolution(16, 4, bias=True),
                         lambda gen, half: (_rand(2, 9, 16, dtype=half, gen=gen), _rand(2, 9, 16, dtype=half, gen=gen))),
}


@pytest.mark.parametrize('name', list(MODULES))
@pytest.mark.parametrize('half', HALF)
def test_modules_under_autocast(name, half):
    "Norms and the short convolution: output in x's dtype, float32 rounded once, as every gradient (weights: float32)."
    make, inputs = MODULES[name]
    torch.manual_seed(0)
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    xs = inputs(torch.Generator().manual_seed(1), half)
    fn = (lambda *a: (m(a[0], residual=a[-1])[0],)) if name == 'ShortConvolution' else (lambda *a: (m(*a),))
    cot = [torch.randn(xs[0].shape).to(half).float()]
    params = list(m.parameters())
    outs, grads, ins = run(fn, xs, range(len(xs)), cot, half, params=params)
    assert outs[0].dtype == half and all(gr.dtype == x.dtype for gr, x in zip(grads, ins + params))
    ref_outs, ref_grads, _ = run(fn, [x.float() for x in xs], range(len(xs)), cot, params=params)
    labels = ['y'] + [f'd{i}' for i in range(len(xs))] + [f'd{n}' for n, _ in m.named_parameters()]
    for label, ref, x in zip(labels, ref_outs + list(ref_grads), outs + list(grads)):
        within_rounding(f'{name} {label} ({half})', ref, x)


def test_conv_update_under_autocast():
    "`causal_conv1d` and one decoding step `causal_conv1d_update` continue each other under autocast."
    gen = torch.Generator().manual_seed(0)
    x = _rand(2, 6, 8, dtype=torch.bfloat16, gen=gen)
    w, b = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, cache = causal_conv1d(x[:, :5], w, b, output_final_state=True, activation='silu')
        y1, _ = causal_conv1d_update(x[:, 5], cache, weight=w, bias=b, activation='silu')
    ref = causal_conv1d(x.float(), w, b, activation='silu')[0]
    assert y.dtype == y1.dtype == cache.dtype == torch.bfloat16
    within_rounding('causal_conv1d', ref[:, :5], y)
    within_rounding('causal_conv1d_update', ref[:, 5], y1)


def _layer(mode, conv, seed=0):
    torch.manual_seed(seed)
    return GatedLinearAttention(mode=mode, hidden_size=32, num_heads=2, use_short_conv=conv, layer_idx=0)


def _rounded(module, half=torch.bfloat16):
    "A copy of `module` with its parameters rounded to `half` (kept in float32)."
    m = copy.deepcopy(module)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(half).float())
    return m


def _errors(ref, xs):
    "The relative RMS error of each tensor of `xs` against `ref`."
    return [get_err_ratio(r, x) for r, x in zip(ref, xs)]


def check_near_float32(name, run, module, *inputs, half=torch.bfloat16):
    """`run(module, *inputs, amp)` -> tensors (outputs, gradients). Under autocast the projections round weights and
    activations to `half`, and a layer amplifies that wherever it is sensitive (an RMSNorm of a nearly-zero head
    output): a fixed bound would be either loose or flaky. So each tensor's error is bounded by 5 times what the
    same rounding of the weights and inputs alone does in float32, plus 2e-3 (measured on the CPU in bf16 over
    about 2000 outputs and gradients of random layers: median 1.3 times, worst 3.5)."""
    ref, amp = run(module, *inputs, amp=False), run(module, *inputs, amp=True)
    rounded = run(_rounded(module, half), *(x.to(half).float() if x.is_floating_point() else x for x in inputs),
                  amp=False)
    for i, (e, e_bf16) in enumerate(zip(_errors(ref, amp), _errors(ref, rounded))):
        assert e <= 5 * e_bf16 + 2e-3, f'{name}: tensor {i}: error {e:.1e}, {half} rounding alone {e_bf16:.1e}'
    return amp


def _layer_grads(layer, x, dy, amp, half=torch.bfloat16):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=half, enabled=amp):
        y = layer(x)[0]
        (y.float() * dy).sum().backward()   # inside the block, as much user code does
    return [y, x.grad] + [p.grad.clone() for p in layer.parameters()]


@settings(max_examples=4, **SETTINGS)
@given(mode=st.sampled_from(['chunk', 'fused_chunk', 'fused_recurrent']), conv=st.booleans(),
       T=st.sampled_from([20, 70]), seed=st.integers(0, 2 ** 16))
def test_layer_modes_under_autocast(mode, conv, T, seed):
    "The layer in each mode under bf16 autocast: output bf16, output and every gradient near float32's."
    layer = _layer(mode, conv)
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(2, T, 32, generator=gen), torch.randn(2, T, 32, generator=gen)
    y, dx = check_near_float32(f'{mode} conv={conv} T={T}', _layer_grads, layer, x, dy)[:2]
    assert (y.dtype, dx.dtype) == (torch.bfloat16, torch.float32)


def _prefill_and_decode(layer, x, amp, half=torch.bfloat16):
    "70 tokens at once (chunk mode), then three one-token steps with a cache."
    cache = Cache()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=half, enabled=amp):
        outs = [layer(x[:, :70], past_key_values=cache, use_cache=True)[0]]
        outs += [layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(70, 73)]
    return [torch.cat(outs, 1), cache[0]['recurrent_state']] + list(cache[0]['conv_state'])


def test_layer_decodes_under_autocast():
    "Prefill then decoding with a cache under bf16 autocast: near float32's outputs and states; states float32."
    out = check_near_float32('decoding', _prefill_and_decode, _layer('chunk', True).eval(), torch.randn(2, 73, 32))
    assert out[1].dtype == torch.float32


def _tiny_model(seed=0):
    from myfla_gla.models.gla import GLAConfig, GLAForCausalLM
    torch.manual_seed(seed)
    return GLAForCausalLM(GLAConfig(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=64,
                                    use_short_conv=True))


def _model_grads(model, ids, amp, half=torch.bfloat16, loss_scale=1.):
    "Loss, logits and parameter gradients; `loss_scale` as a `GradScaler` would (fp16 gradients of 1e-7 underflow)."
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=half, enabled=amp):
        out = model(ids, labels=ids)
    (out.loss * loss_scale).backward()
    return [out.loss, out.logits] + [p.grad / loss_scale for p in model.parameters()]


@settings(max_examples=2, **SETTINGS)
@given(T=st.sampled_from([30, 80]), seed=st.integers(0, 2 ** 16))
def test_model_under_autocast(T, seed):
    "The model (80 tokens: chunk mode): bf16 logits, float32 loss; loss, logits and every gradient near float32's."
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(seed))
    loss, logits = check_near_float32('model', _model_grads, _tiny_model(), ids)[:2]
    assert (logits.dtype, loss.dtype) == (torch.bfloat16, torch.float32)


def train_and_generate(device='cpu', half=torch.bfloat16, scaler=None):
    """15 AdamW steps of a tiny model under autocast (backward inside the block, as much user code does; with a
    `GradScaler` for fp16); then greedy `generate` from a 100-token prompt under autocast (prefill in chunk mode,
    decoding with the cache). Returns the losses, and per generated token how far its float32 logit is below the
    float32 model's top one at that position (0: float32's own choice), with the tolerance for bf16/fp16 error."""
    model = _tiny_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 80), generator=gen).to(device)
    losses = []
    for _ in range(15):
        with torch.autocast(device, dtype=half):
            loss = model(ids, labels=ids).loss
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    prompt = torch.randint(0, 64, (1, 100), generator=gen).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=half):
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 108) and torch.equal(out[:, :100], prompt)
    with torch.no_grad():
        logits = model(out).logits[0, 99:107].float()   # float32: the logits that chose tokens 100..107
    chosen = logits.gather(1, out[0, 100:, None])[:, 0]
    gap = logits.max(1).values - chosen                 # 0 where the token is float32's top one
    return losses, gap, 2e-2 * logits.std(1)            # 2e-2: above the logits' bf16 error (measured 3e-3)


def check_training(losses, gap, tol):
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    assert (gap <= tol).all(), (gap, tol)               # every token float32's choice, or within the error of it
    assert (gap == 0).float().mean() >= 0.75, gap       # and mostly float32's own choice


def test_model_trains_and_generates_under_autocast():
    "A tiny model trains 15 steps under CPU bf16 autocast with a falling loss, and generates from 100 tokens."
    check_training(*train_and_generate())
