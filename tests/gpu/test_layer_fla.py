"""FLA parity for the layer, on CUDA: FLA 0.6.0's `GatedLinearAttention` with random weights, its `state_dict` loaded
into ours with `strict=True`, then the same outputs, gradients (input and every parameter), caches after a prefill,
and outputs and caches through decoding steps, over a pairwise-covering configuration matrix.
Skipped unless CUDA is available and FLA is importable."""
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs CUDA', allow_module_level=True)
fla = pytest.importorskip('fla')
from fla.layers import GatedLinearAttention as FLAGatedLinearAttention  # noqa: E402
from fla.models.utils import Cache as FLACache  # noqa: E402

from matrix import layer_kwargs, pairwise, randomize_norms_and_biases  # noqa: E402
from myfla_gla import Cache, GatedLinearAttention, assert_close, get_err_ratio  # noqa: E402

# bounds on the relative RMS error between FLA and us: (outputs and states, gradients). FLA's float32 matmuls use
# tf32 (~1e-3); in bf16 the two round differently, and rounding moves q, k entries across the ReLU feature
# map's kink (gates across `clamp_min`), which flips their gradients.
RATIO = {torch.float32: (5e-3, 1e-2), torch.bfloat16: (2e-2, 2e-1)}

FACTORS = {
    'mode': ['chunk', 'fused_recurrent', 'fused_chunk'],
    'conv': [None, 'conv', 'conv+bias'],
    'gate': ['fused', 'swish-unfused', 'sigmoid', 'none'],
    'gqa': [1, 2],
    'feature_map': [None, 'relu'],
    'gates': [(16, None), (1, -0.3)],
    'inputs': ['none', 'mask', 'cu_seqlens'],
}


MATRIX = pairwise(FACTORS)


def pair(case, dtype, seed):
    "FLA's layer (random weights everywhere) and ours with its state dict, both in `dtype` on CUDA."
    kw = dict(layer_kwargs(case, hidden=128), layer_idx=0)
    fla_kw = dict(kw, mode='chunk') if kw['mode'] == 'fused_chunk' else kw   # FLA 0.6.0 raises for fused_chunk
    torch.manual_seed(seed)
    theirs = randomize_norms_and_biases(FLAGatedLinearAttention(**fla_kw)).to('cuda', dtype)
    ours = GatedLinearAttention(**kw).to('cuda', dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def make_inputs(kind, dtype, seed, B=3, T=200, D=128):
    g = torch.Generator().manual_seed(seed)
    if kind == 'cu_seqlens':
        x = torch.randn(1, 300, D, generator=g).to('cuda', dtype)
        return x, {'cu_seqlens': torch.tensor([0, 100, 100, 230, 300], dtype=torch.int32, device='cuda')}
    x = torch.randn(B, T, D, generator=g).to('cuda', dtype)
    if kind == 'mask':
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :30], mask[2, :150] = 0, 0                  # left padding
        return x, {'attention_mask': mask.cuda()}
    return x, {}


def forward_backward(layer, x, kw):
    x = x.detach().clone().requires_grad_(True)
    o = layer(x, **kw)[0]
    w = torch.linspace(-1, 1, o.numel(), device='cuda').view_as(o)
    (o.float() * w).sum().backward()
    return o, {'x': x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def snapshot(state):
    "A copy of a cache record (FLA's decoding steps write into the conv caches in place)."
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    return {k: tuple(map(clone, v)) if isinstance(v, tuple) else clone(v) for k, v in state.items()}


def prefill_and_decode(layer, cache, x, kw, steps):
    outs = []
    with torch.no_grad():
        outs.append(layer(x, past_key_values=cache, use_cache=True, **kw)[0])
        states = [snapshot(cache[0])]
        for s in steps:
            step_kw = {}
            if 'attention_mask' in kw:
                kw['attention_mask'] = torch.cat([kw['attention_mask'], kw['attention_mask'].new_ones(x.shape[0], 1)], 1)
                step_kw = {'attention_mask': kw['attention_mask']}
            elif 'cu_seqlens' in kw:
                step_kw = {'cu_seqlens': torch.arange(len(kw['cu_seqlens']), dtype=torch.int32, device='cuda')}
            outs.append(layer(s, past_key_values=cache, use_cache=True, **step_kw)[0])
    return outs, states + [snapshot(cache[0])]


def check_states(a, b, ratio, what):
    assert_close(f'{what} recurrent_state', a['recurrent_state'], b['recurrent_state'], ratio, err_atol=1e-6)
    assert b['recurrent_state'].dtype == a['recurrent_state'].dtype == torch.float32
    if a['conv_state'] is None:
        assert b['conv_state'] is None
        return
    for i, (ca, cb) in enumerate(zip(a['conv_state'], b['conv_state'])):
        assert ca.shape == cb.shape and ca.dtype == cb.dtype
        assert_close(f'{what} conv_state[{i}]', ca, cb, ratio, err_atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', MATRIX, ids=lambda c: '-'.join(str(v) for v in c.values()).replace(' ', ''))
def test_same_as_fla(case, dtype):
    seed = zlib.crc32(str(case).encode())
    theirs, ours = pair(case, dtype, seed)
    fwd, bwd = RATIO[dtype]
    x, kw = make_inputs(case['inputs'], dtype, seed)
    o1, g1 = forward_backward(theirs, x, dict(kw))
    o2, g2 = forward_backward(ours, x, dict(kw))
    assert o2.dtype == o1.dtype
    assert_close('output', o1, o2, fwd, err_atol=1e-6)
    if 'attention_mask' in kw:
        assert (o2[kw['attention_mask'] == 0] == 0).all()
    for name in g1:
        assert_close(f'd{name}', g1[name], g2[name], bwd, err_atol=1e-6)
    n = 1 if 'cu_seqlens' in kw else x.shape[0]
    n_seq = len(kw['cu_seqlens']) - 1 if 'cu_seqlens' in kw else x.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    steps = [torch.randn(n, n_seq if n == 1 else 1, x.shape[-1], generator=g).to('cuda', dtype) for _ in range(3)]
    outs1, states1 = prefill_and_decode(theirs, FLACache(), x, dict(kw), steps)
    outs2, states2 = prefill_and_decode(ours, Cache(), x, dict(kw), steps)
    for i, (a, b) in enumerate(zip(outs1, outs2)):
        assert_close(f'decoding output {i}', a, b, fwd, err_atol=1e-6)
    check_states(states1[0], states2[0], fwd, 'prefill')
    check_states(states1[1], states2[1], fwd, 'decoded')


def test_fla_0_6_0_bugs_we_fix():
    "Documents spec 10.6 and 10.8 on FLA itself: fused_chunk beyond 64 tokens raises; use_cache=False wipes conv."
    case = dict(mode='chunk', conv='conv', gate='fused', gqa=1, feature_map=None, gates=(16, None), inputs='none')
    theirs, ours = pair(case, torch.float32, 0)
    x = torch.randn(2, 100, 128, device='cuda')
    theirs.mode = ours.mode = 'fused_chunk'
    with pytest.raises(NotImplementedError):
        theirs(x)
    o_fused_chunk = ours(x)[0]
    ours.mode = 'chunk'
    assert get_err_ratio(ours(x)[0], o_fused_chunk) < 1e-5
    fla_cache, our_cache = FLACache(), Cache()
    for layer, cache in ((theirs, fla_cache), (ours, our_cache)):
        layer.mode = 'chunk'
        with torch.no_grad():
            layer(x[:, :10], past_key_values=cache, use_cache=True)
            layer(x[:, 10:11], past_key_values=cache, use_cache=False)
    assert fla_cache[0]['conv_state'] == (None, None, None)
    assert all(isinstance(c, torch.Tensor) for c in our_cache[0]['conv_state'])
