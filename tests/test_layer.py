"""GatedLinearAttention: a configuration matrix in float64 against an independent token-by-token computation written
here from the layer's weights; the three modes; gradients; prefill + decoding; FLA's own layer tests (spec 9.5); the
seed's pseudo-fixtures and test scenarios (seed sections 2.4 and 4); the FLA bugs fixed (spec 10.6, 10.8, 10.12);
bad input."""
import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import myfla_gla.layers.gla as gla_module
import myfla_gla.utils as utils_module
from matrix import layer_kwargs, pairwise, randomize_norms_and_biases
from myfla_gla import Cache, GatedLinearAttention, assert_close

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------------
# The independent reference: one token at a time, every step written out from the weights (spec section 7).
# ---------------------------------------------------------------------------------------------------------------
ACTS = {'relu': F.relu, 'swish': F.silu, 'silu': F.silu, 'sigmoid': torch.sigmoid, 'logsigmoid': F.logsigmoid,
        'sqrelu': lambda x: F.relu(x) ** 2, 'gelu': lambda x: F.gelu(x, approximate='tanh'), 'identity': lambda x: x}


def sequences_of(x, attention_mask=None, cu_seqlens=None):
    "(row, positions) of each sequence, as the layer must see them."
    B, T, _ = x.shape
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        return [(0, list(range(cu[n], cu[n + 1]))) for n in range(len(cu) - 1)]
    if attention_mask is not None:
        m = attention_mask[:, -T:]
        return [(b, [t for t in range(T) if m[b, t]]) for b in range(B)]
    return [(b, list(range(T))) for b in range(B)]


def reference(layer, x, attention_mask=None, cu_seqlens=None, params=None):
    """The layer's output token by token, and the final states per sequence: recurrent `[N, H, V, K]` and the three
    conv windows `[N, D, W]` (raw projections, newest last). `params` (name -> tensor) defaults to the layer's
    weights in float64; pass live parameters to differentiate through the reference."""
    P = params if params is not None else {k: v.detach().to(F64) for k, v in layer.state_dict().items()}
    x = x.to(P['q_proj.weight'].dtype)
    H, Hkv, K, V = layer.num_heads, layer.num_kv_heads, layer.head_k_dim, layer.head_v_dim
    kv_head = torch.arange(H) // (H // Hkv)                  # query head i reads kv head i // groups
    W = layer.conv_size
    fmap = ACTS[layer._ref_feature_map] if layer._ref_feature_map else None
    norm_w = P.get('g_norm_swish_gate.weight', P.get('g_norm.weight'))
    eps = (layer.g_norm_swish_gate if layer.fuse_norm_and_gate else layer.g_norm).eps
    out = torch.zeros(*x.shape[:2], layer.hidden_size, dtype=x.dtype)
    finals = []
    for n, (b, ts) in enumerate(sequences_of(x, attention_mask, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=x.dtype)
        hist = {name: torch.zeros(d, W, dtype=x.dtype) for name, d in
                (('q', layer.key_dim), ('k', layer.key_dim_per_group), ('v', layer.value_dim_per_group))}
        for t in ts:
            xt = x[b, t]
            qkv = {name: P[f'{name}_proj.weight'] @ xt for name in 'qkv'}
            if layer.use_short_conv:
                for name in 'qkv':
                    hist[name] = torch.cat([hist[name][:, 1:], qkv[name][:, None]], 1)
                    pre = (hist[name] * P[f'{name}_conv1d.weight'][:, 0, :]).sum(-1)
                    if f'{name}_conv1d.bias' in P:
                        pre = pre + P[f'{name}_conv1d.bias']
                    qkv[name] = F.silu(pre)
            gk = P['gk_proj.1.weight'] @ (P['gk_proj.0.weight'] @ xt) + P['gk_proj.1.bias']
            gk = F.logsigmoid(gk) / layer.gate_logit_normalizer
            if layer.clamp_min is not None:
                gk = gk.clamp(min=layer.clamp_min)
            q = qkv['q'].view(H, K)
            k, v, gk = qkv['k'].view(Hkv, K)[kv_head], qkv['v'].view(Hkv, V)[kv_head], gk.view(Hkv, K)[kv_head]
            if fmap is not None:
                q, k = fmap(q), fmap(k)
            S = gk.exp()[:, :, None] * S + k[:, :, None] * v[:, None, :]
            o = torch.einsum('hk,hkv->hv', q, S) / math.sqrt(K)
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps)
            if norm_w is not None:
                o = o * norm_w
            o = o.reshape(-1)
            if layer.use_output_gate:
                g = P['g_proj.weight'] @ xt
                o = o * (F.silu(g) if layer.fuse_norm_and_gate else ACTS[layer._ref_gate_fn](g))
            out[b, t] = P['o_proj.weight'] @ o
        finals.append((S.transpose(-1, -2), tuple(hist[name] for name in 'qkv')))
    return out, finals


def make_layer(**kw):
    "A float64 layer with random (non-default) weights everywhere, remembering its feature map and gate name."
    fm, gate_fn = kw.get('feature_map'), kw.get('gate_fn', 'swish')
    layer = GatedLinearAttention(**kw)
    layer._ref_feature_map, layer._ref_gate_fn = fm, gate_fn
    return randomize_norms_and_biases(layer).double()


def max_err(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# The configuration matrix, pairwise-covered: every pair of levels of any two factors appears in some case.
# ---------------------------------------------------------------------------------------------------------------
FACTORS = {
    'mode': ['chunk', 'fused_chunk', 'fused_recurrent'],
    'conv': [None, 'conv', 'conv+bias'],
    'gate': ['fused', 'swish-unfused', 'silu', 'sigmoid', 'none', 'fused-no-affine'],
    'gqa': [1, 2],
    'feature_map': [None, 'relu', 'swish'],
    'gates': [(16, None), (1, -0.3), (0.5, None)],
    'inputs': ['none', 'mask', 'cu_seqlens'],
}


MATRIX = pairwise(FACTORS)


def matrix_inputs(kind, hidden, T=70, generator=None):
    if kind == 'cu_seqlens':
        cu = torch.tensor([0, 30, 30, 77], dtype=torch.int32)          # includes an empty sequence
        return torch.randn(1, 77, hidden, dtype=F64, generator=generator), {'cu_seqlens': cu}
    x = torch.randn(3, T, hidden, dtype=F64, generator=generator)
    if kind == 'mask':
        mask = torch.ones(3, T + 2, dtype=torch.long)                   # 2 extra leading (past) columns
        mask[0, :7] = 0                                                 # left padding
        mask[1, -9:] = 0                                                # right padding
        mask[2, 20:25] = 0                                              # a hole
        return x, {'attention_mask': mask}
    return x, {}


def test_matrix_is_small_and_covers_every_level():
    assert len(MATRIX) <= 25
    for name, levels in FACTORS.items():
        assert {repr(c[name]) for c in MATRIX} == {repr(l) for l in levels}


@pytest.mark.parametrize('case', MATRIX, ids=lambda c: '-'.join(str(v) for v in c.values()).replace(' ', ''))
def test_matrix_against_token_by_token_reference(case):
    torch.manual_seed(zlib.crc32(str(case).encode()))
    layer = make_layer(**layer_kwargs(case), layer_idx=0)
    x, kw = matrix_inputs(case['inputs'], layer.hidden_size)
    cache = Cache()
    o = layer(x, past_key_values=cache, use_cache=True, **kw)[0]
    ref, finals = reference(layer, x, **kw)
    assert_close('output', ref, o, 1e-10, err_atol=0)
    if 'attention_mask' in kw:                                        # exact zeros at padding
        pad = kw['attention_mask'][:, -x.shape[1]:] == 0
        assert (o[pad] == 0).all()
    state = cache[0]
    assert state['recurrent_state'].shape == (len(finals), layer.num_heads, layer.head_v_dim, layer.head_k_dim)
    assert_close('recurrent state', torch.stack([f[0] for f in finals]), state['recurrent_state'], 1e-10, err_atol=0)
    if layer.use_short_conv:
        for i, c in enumerate(state['conv_state']):
            assert_close(f'conv cache {i}', torch.stack([f[1][i] for f in finals]), c, 1e-12, err_atol=0)
    else:
        assert state['conv_state'] is None
    assert cache.get_seq_length(0) == x.shape[1]


GRAD_CASES = [dict(mode='chunk', conv='conv+bias', gate='swish-unfused', gqa=2, feature_map='relu', gates=(1, -0.3),
                   inputs='mask'),
              dict(mode='fused_chunk', conv='conv', gate='fused', gqa=1, feature_map=None, gates=(16, None),
                   inputs='cu_seqlens'),
              dict(mode='fused_recurrent', conv=None, gate='sigmoid', gqa=2, feature_map='swish', gates=(0.5, None),
                   inputs='none')]


@pytest.mark.parametrize('case', GRAD_CASES, ids=lambda c: c['mode'])
def test_gradients_reach_every_parameter_and_match_the_reference(case):
    layer = make_layer(**layer_kwargs(case, hidden=16, heads=2))
    x, kw = matrix_inputs(case['inputs'], layer.hidden_size, T=66)
    x.requires_grad_(True)
    o = layer(x, **kw)[0]
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum(), [x, *layer.parameters()])
    names = ['x'] + [n for n, _ in layer.named_parameters()]
    params = dict(layer.named_parameters())
    ref, _ = reference(layer, x, params=params, **kw)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, *layer.parameters()])
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert_close(f'd{name}', r, g, 1e-9, err_atol=0)


@pytest.mark.parametrize('dtype, ratio', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('inputs', ['none', 'cu_seqlens'])
def test_the_three_modes_agree(dtype, ratio, inputs):
    layer = make_layer(hidden_size=32, num_heads=2, use_short_conv=True, num_kv_heads=1, layer_idx=0).to(dtype)
    x, kw = matrix_inputs(inputs, 32, T=100)
    x = x.to(dtype)
    h0 = torch.rand(3, 2, 16, 8, dtype=torch.float32 if dtype != F64 else F64)
    results = {}
    for mode in ('fused_recurrent', 'chunk', 'fused_chunk'):
        layer.mode = mode
        cache = Cache()
        cache.update(recurrent_state=h0.clone(), layer_idx=0, offset=0)
        o = layer(x, past_key_values=cache, use_cache=True, **kw)[0]
        results[mode] = (o, cache[0]['recurrent_state'], cache[0]['conv_state'])
    for mode in ('chunk', 'fused_chunk'):
        for i, what in enumerate(('output', 'recurrent state')):
            assert_close(f'{mode} {what}', results['fused_recurrent'][i], results[mode][i], ratio, err_atol=0)
        for a, b in zip(results['fused_recurrent'][2], results[mode][2]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Prefill, then token-by-token decoding, equals one full pass.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('prefill', [5, 67])
@pytest.mark.parametrize('conv, gqa, padded', [(False, 1, False), (True, 1, False), (True, 2, True), (False, 2, True)])
def test_prefill_then_decoding_equals_one_pass(prefill, conv, gqa, padded):
    torch.manual_seed(prefill + 10 * conv + 100 * gqa)
    layer = make_layer(hidden_size=32, num_heads=2, num_kv_heads=2 // gqa, use_short_conv=conv, conv_size=4,
                       layer_idx=1)
    B, steps = 3, 4
    T = prefill + steps
    x = torch.randn(B, T, 32, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:                                              # left padding, as in generation (FLA's test_generation)
        mask[0, :3], mask[2, :prefill - 1] = 0, 0
    cache = Cache()
    kw = {'attention_mask': mask[:, :prefill]} if padded else {}
    outs = [layer(x[:, :prefill], past_key_values=cache, use_cache=True, **kw)[0]]
    for t in range(prefill, T):
        kw = {'attention_mask': mask[:, :t + 1]} if padded else {}
        outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)[0])
    stepped = torch.cat(outs, 1)
    full_cache = Cache()
    full = layer(x, past_key_values=full_cache, use_cache=True, **({'attention_mask': mask} if padded else {}))[0]
    ref, finals = reference(layer, x, attention_mask=mask if padded else None)
    assert_close('decoded vs reference', ref, stepped, 1e-9, err_atol=0)
    assert_close('decoded vs one pass', full, stepped, 1e-9, err_atol=0)
    assert_close('recurrent state', full_cache[1]['recurrent_state'], cache[1]['recurrent_state'], 1e-9, err_atol=0)
    assert_close('recurrent state vs reference', torch.stack([f[0] for f in finals]), cache[1]['recurrent_state'], 1e-9, err_atol=0)
    if conv:
        for a, b in zip(full_cache[1]['conv_state'], cache[1]['conv_state']):
            assert_close('conv cache', a, b, 1e-12, err_atol=0)
    assert cache.get_seq_length(1) == T and len(cache) == 2 and cache[0] is None


def test_right_padding_while_decoding_skips_the_row():
    "A row whose newest mask entry is 0 is not advanced (spec 10.4): its output is 0 and its states stay."
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
    x = torch.randn(2, 8, 16, dtype=F64)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5] = 0                                              # row 0 skips token 5
    cache = Cache()
    outs = [layer(x[:, :5], past_key_values=cache, use_cache=True)[0]]
    before = (cache[0]['recurrent_state'][0].clone(), [c[0].clone() for c in cache[0]['conv_state']])
    for t in range(5, 8):
        outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)[0])
        if t == 5:
            assert (outs[-1][0] == 0).all()
            assert torch.equal(cache[0]['recurrent_state'][0], before[0])
            assert all(torch.equal(c[0], p) for c, p in zip(cache[0]['conv_state'], before[1]))
    ref, _ = reference(layer, x, attention_mask=mask)
    assert_close('output', ref, torch.cat(outs, 1), 1e-9, err_atol=0)


def test_decoding_with_packed_sequences():
    "Decoding several packed sequences with `cu_seqlens` (one token each) continues each from its own state."
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
    cu = torch.tensor([0, 4, 4, 9])
    x = torch.randn(1, 9, 16, dtype=F64)
    nxt = torch.randn(1, 3, 16, dtype=F64)
    cache = Cache()
    layer(x, cu_seqlens=cu, past_key_values=cache, use_cache=True)
    o = layer(nxt, cu_seqlens=torch.arange(4), past_key_values=cache, use_cache=True)[0]
    for n, (s, e) in enumerate(((0, 4), (4, 4), (4, 9))):
        whole = torch.cat([x[:, s:e], nxt[:, n:n + 1]], 1)
        assert_close(f'sequence {n}', layer(whole)[0][:, -1], o[:, n], 1e-9, err_atol=0)


# ---------------------------------------------------------------------------------------------------------------
# FLA's own layer tests (spec 9.5)
# ---------------------------------------------------------------------------------------------------------------
def test_cache_requires_layer_idx():
    layer = GatedLinearAttention(hidden_size=16, num_heads=4)
    with pytest.raises(ValueError, match='requires `layer_idx`'):
        layer(torch.randn(1, 3, 16), past_key_values=Cache(), use_cache=True)


def test_layer_prefers_explicit_cu_seqlens_over_attention_mask():
    torch.manual_seed(0)
    layer = GatedLinearAttention(hidden_size=16, num_heads=2, num_kv_heads=2, expand_k=1, expand_v=1).half().eval()
    x = torch.randn(1, 6, 16).half()
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with torch.no_grad():
        o1 = layer(x, cu_seqlens=cu)[0]
        o2 = layer(x, attention_mask=torch.ones(1, 6, dtype=torch.bool), cu_seqlens=cu)[0]
        o3 = layer(x, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool))[0]
    torch.testing.assert_close(o1, o2)
    assert o3.shape == x.shape and (o3[0, 4:] == 0).all() and torch.isfinite(o3).all()
    # and the packed result is two independent sequences
    with torch.no_grad():
        torch.testing.assert_close(o1[:, 3:], layer(x[:, 3:])[0])


# ---------------------------------------------------------------------------------------------------------------
# The seed's pseudo-fixtures (seed 2.4) and scenarios (seed 4)
# ---------------------------------------------------------------------------------------------------------------
def spy(monkeypatch, module, name):
    "Wrap `module.name`, recording the keyword arguments of every call."
    calls, real = [], getattr(module, name)
    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_seed_fixture_1_basic_chunk(monkeypatch):
    torch.manual_seed(42)
    pads = spy(monkeypatch, utils_module, 'pad_input')
    layer = GatedLinearAttention(mode='chunk', hidden_size=16, num_heads=2, use_short_conv=False,
                                 use_output_gate=True, layer_idx=0)
    fused = []
    layer.g_norm_swish_gate.register_forward_hook(lambda *a: fused.append(1))
    x = torch.randn(2, 8, 16)
    cache = Cache()
    o, attn, pkv = layer(x, past_key_values=cache, use_cache=True)
    assert o.shape == (2, 8, 16) and attn is None and pkv is cache
    assert cache[0]['recurrent_state'] is not None and cache[0]['recurrent_state'].shape == (2, 2, 8, 4)
    assert pads == [] and fused == [1] and not hasattr(layer, 'g_norm')
    ref, _ = reference(make_ref_view(layer), x)
    assert_close('output', ref, o, 1e-5, err_atol=0)


def make_ref_view(layer, feature_map=None, gate_fn='swish'):
    layer._ref_feature_map, layer._ref_gate_fn = feature_map, gate_fn
    return layer


def test_seed_fixture_2_mask_and_short_conv(monkeypatch):
    torch.manual_seed(1)
    pads = spy(monkeypatch, utils_module, 'pad_input')
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    x = torch.randn(2, 4, 16, dtype=F64)
    cache = Cache()
    o = layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)[0]
    assert len(pads) == 1
    assert (o[0, :2] == 0).all() and (o[1, :1] == 0).all() and (o[0, 2:] != 0).all()
    conv = cache[0]['conv_state']
    assert isinstance(conv, tuple) and len(conv) == 3
    assert [c.shape for c in conv] == [(2, 8, 4), (2, 8, 4), (2, 16, 4)]
    # the conv caches hold the last inputs of each row, zeros where the row had none
    assert (conv[0][0, :, :2] == 0).all() and (conv[0][1, :, :1] == 0).all()
    assert_close('output', reference(layer, x, attention_mask=mask)[0], o, 1e-10, err_atol=0)
    for b in range(2):                                      # each row as if alone
        alone = layer(x[b:b + 1, mask[b].bool()])[0]
        assert_close(f'row {b}', alone[0], o[b, mask[b].bool()], 1e-12, err_atol=0)


def test_seed_fixture_3_cu_seqlens_and_feature_map(monkeypatch):
    torch.manual_seed(2)
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, feature_map='relu')
    convs = spy(monkeypatch, layer.q_conv1d, 'forward')
    ops = spy(monkeypatch, gla_module, 'fused_recurrent_gla')
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    x = torch.randn(1, 9, 16, dtype=F64)
    o = layer(x, cu_seqlens=cu)[0]
    assert torch.diff(convs[0]['cu_seqlens']).tolist() == [5, 4]
    assert ops[0]['cu_seqlens'].tolist() == [0, 5, 9] and ops[0]['state_v_first'] is True
    separate = torch.cat([layer(x[:, :5])[0], layer(x[:, 5:])[0]], 1)
    assert_close('packed vs separate', separate, o, 1e-12, err_atol=0)
    assert_close('reference', reference(layer, x, cu_seqlens=cu)[0], o, 1e-10, err_atol=0)
    # the same packed batch through the chunk op (forced by a length > 64) gives the same sequences
    long = torch.randn(1, 80, 16, dtype=F64)
    cu_long = torch.tensor([0, 70, 80])
    chunked = layer(long, cu_seqlens=cu_long)[0]
    layer.mode = 'fused_recurrent'
    assert_close('chunk vs recurrent (varlen)', layer(long, cu_seqlens=cu_long)[0], chunked, 1e-12, err_atol=0)


def test_seed_fixture_4_short_input_goes_recurrent(monkeypatch):
    torch.manual_seed(3)
    chunks = spy(monkeypatch, gla_module, 'chunk_gla')
    recurrent = spy(monkeypatch, gla_module, 'fused_recurrent_gla')
    layer = GatedLinearAttention(mode='chunk', hidden_size=16, num_heads=2, layer_idx=0).eval()
    x = torch.randn(2, 64, 16)
    cache = Cache()
    with torch.no_grad():
        o1 = layer(x[:, :32], past_key_values=cache, use_cache=True)[0]
        s1 = cache[0]['recurrent_state'].clone()
        o2 = layer(x[:, 32:], past_key_values=cache, use_cache=True)[0]
        full = layer(x)[0]
    assert chunks == [] and len(recurrent) == 3
    assert cache[0]['recurrent_state'].shape == s1.shape == (2, 2, 8, 4)
    assert torch.isfinite(o1).all() and torch.isfinite(o2).all()
    assert_close('two calls vs one', full, torch.cat([o1, o2], 1), 1e-5, err_atol=0)
    with torch.no_grad():
        layer(torch.randn(2, 65, 16))
    assert len(chunks) == 1                                 # 65 tokens: the layer's own mode


# ---------------------------------------------------------------------------------------------------------------
# FLA bugs fixed, and the other documented behaviours
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('T', [1, 5, 70])
def test_use_cache_false_leaves_the_stored_cache_alone(T):
    "Spec 10.8: FLA wipes the conv cache (and a decoding step changes it in place); here nothing stored changes."
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
    x = torch.randn(2, 6 + T, 16, dtype=F64)
    cache = Cache()
    layer(x[:, :6], past_key_values=cache, use_cache=True)
    rs, conv = cache[0]['recurrent_state'], cache[0]['conv_state']
    saved = (rs.clone(), [c.clone() for c in conv])
    o = layer(x[:, 6:], past_key_values=cache, use_cache=False)[0]
    assert cache[0]['recurrent_state'] is rs and cache[0]['conv_state'] is conv
    assert torch.equal(rs, saved[0]) and all(torch.equal(c, s) for c, s in zip(conv, saved[1]))
    assert cache.get_seq_length(0) == 6 + T                 # still counted, as in FLA
    assert_close('output read the cache', layer(x)[0][:, 6:], o, 1e-9, err_atol=0)


def test_fused_chunk_works_beyond_64_tokens():
    "Spec 10.6: FLA 0.6.0's fused_chunk mode raises NotImplementedError for T > 64."
    layer = make_layer(mode='fused_chunk', hidden_size=16, num_heads=2)
    x = torch.randn(2, 100, 16, dtype=F64)
    o = layer(x)[0]
    layer.mode = 'chunk'
    assert_close('fused_chunk vs chunk', layer(x)[0], o, 1e-12, err_atol=0)


def test_cached_record_without_conv_state():
    "Spec 10.12: a record filled by a layer without short convolutions: FLA raises TypeError, here no history."
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
    x = torch.randn(1, 4, 16, dtype=F64)
    cache = Cache()
    cache.update(recurrent_state=torch.zeros(1, 2, 8, 4, dtype=F64), layer_idx=0, offset=0)
    assert_close('no history', layer(x)[0], layer(x, past_key_values=cache, use_cache=True)[0], 1e-12, err_atol=0)


def test_use_cache_without_a_cache_and_output_attentions():
    layer = make_layer(hidden_size=16, num_heads=2, use_short_conv=True)
    x = torch.randn(2, 5, 16, dtype=F64)
    o, attn, pkv = layer(x, use_cache=True, output_attentions=True)
    assert attn is None and pkv is None
    assert torch.equal(o, layer(x)[0])


def test_mask_covering_past_tokens_uses_its_last_columns():
    layer = make_layer(hidden_size=16, num_heads=2)
    x = torch.randn(2, 4, 16, dtype=F64)
    mask = torch.tensor([[0, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(layer(x, attention_mask=mask)[0], layer(x, attention_mask=mask[:, -4:])[0])
    assert torch.equal(layer(x, attention_mask=torch.ones(2, 4))[0][1], layer(x)[0][1])   # no fast path, same numbers


def test_half_precision_dtypes_and_state_layout():
    layer = GatedLinearAttention(hidden_size=32, num_heads=2, use_short_conv=True, layer_idx=0).to(torch.bfloat16)
    x = torch.randn(2, 70, 32, dtype=torch.bfloat16)
    cache = Cache()
    o = layer(x, past_key_values=cache, use_cache=True)[0]
    ref = make_ref_view(layer).double()
    assert o.dtype == torch.bfloat16 and cache[0]['recurrent_state'].dtype == torch.float32
    assert cache[0]['recurrent_state'].shape == (2, 2, 16, 8)                # [N, H, V, K]
    assert all(c.dtype == torch.bfloat16 for c in cache[0]['conv_state'])
    assert_close('bf16 layer vs float64', reference(ref, x)[0], o, 3e-2, err_atol=0)


def test_parameter_names_and_shapes_in_every_configuration():
    for hidden, heads, kv, conv, bias, gate, fuse, gate_fn, affine, r in itertools.product(
            [48], [4], [4, 2, 1], [False, True], [False, True], [True, False], [True, False], ['swish', 'silu'],
            [True, False], [16, 5]):
        layer = GatedLinearAttention(hidden_size=hidden, num_heads=heads, num_kv_heads=kv, use_short_conv=conv,
                                     conv_bias=bias, use_output_gate=gate, fuse_norm=fuse, gate_fn=gate_fn,
                                     elementwise_affine=affine, gate_low_rank_dim=r, conv_size=3)
        kd, vd, g = hidden // 2, hidden, heads // kv
        want = {'q_proj.weight': (kd, hidden), 'k_proj.weight': (kd // g, hidden), 'v_proj.weight': (vd // g, hidden),
                'gk_proj.0.weight': (r, hidden), 'gk_proj.1.weight': (kd // g, r), 'gk_proj.1.bias': (kd // g,),
                'o_proj.weight': (hidden, vd)}
        if gate:
            want['g_proj.weight'] = (vd, hidden)
        if conv:
            for name, d in (('q', kd), ('k', kd // g), ('v', vd // g)):
                want[f'{name}_conv1d.weight'] = (d, 1, 3)
                if bias:
                    want[f'{name}_conv1d.bias'] = (d,)
        fused = gate and fuse and gate_fn == 'swish'
        if affine:
            want['g_norm_swish_gate.weight' if fused else 'g_norm.weight'] = (vd // heads,)
        got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        assert got == want, (kv, conv, bias, gate, fuse, gate_fn, affine)
        assert layer.fuse_norm_and_gate == fused and hasattr(layer, 'gate_fn') == (not fused)
        GatedLinearAttention(hidden_size=hidden, num_heads=heads, num_kv_heads=kv, use_short_conv=conv,
                             conv_bias=bias, use_output_gate=gate, fuse_norm=fuse, gate_fn=gate_fn,
                             elementwise_affine=affine, gate_low_rank_dim=r, conv_size=3
                             ).load_state_dict(layer.state_dict(), strict=True)


def test_defaults_follow_fla():
    layer = GatedLinearAttention()
    assert (layer.mode, layer.hidden_size, layer.expand_k, layer.expand_v, layer.num_heads, layer.num_kv_heads,
            layer.feature_map_fn, layer.use_short_conv, layer.conv_size, layer.conv_bias, layer.use_output_gate,
            layer.gate_logit_normalizer, layer.clamp_min, layer.layer_idx, layer.fuse_norm_and_gate) == \
        ('chunk', 1024, 0.5, 1.0, 4, 4, None, False, 4, False, True, 16, None, None, True)
    assert layer.g_norm_swish_gate.eps == 1e-5 and layer.gk_proj[0].out_features == 16


def test_bad_input():
    layer = GatedLinearAttention(hidden_size=16, num_heads=2)
    x = torch.randn(2, 5, 16)
    with pytest.raises(AssertionError, match=r'\[batch_size, seq_len\]'):
        layer(x, attention_mask=torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match='hidden_states'):
        layer(x[0])
    with pytest.raises(ValueError, match='hidden_size=16'):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match='attention_mask'):
        layer(x, attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match='attention_mask'):
        layer(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match='batch size'):
        layer(x, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(KeyError, match='powlu'):
        GatedLinearAttention(hidden_size=16, num_heads=2, gate_fn='powlu', fuse_norm=False)


# ---------------------------------------------------------------------------------------------------------------
# Properties over random masks and short lengths
# ---------------------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

LAYERS = {}


def small_layer(conv, gqa):
    if (conv, gqa) not in LAYERS:
        torch.manual_seed(7)
        LAYERS[conv, gqa] = make_layer(hidden_size=16, num_heads=2, num_kv_heads=2 // gqa, use_short_conv=conv,
                                       conv_size=3, clamp_min=-0.2, gate_logit_normalizer=2)
    return LAYERS[conv, gqa]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=st.booleans(), gqa=st.sampled_from([1, 2]), T=st.integers(1, 9),
       rows=st.lists(st.lists(st.booleans(), min_size=9, max_size=9), min_size=1, max_size=3), data=st.data())
def test_property_padding_packing_and_causality(conv, gqa, T, rows, data):
    layer = small_layer(conv, gqa)
    mask = torch.tensor(rows, dtype=torch.long)[:, :T]
    B = mask.shape[0]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(B, T, 16, dtype=F64, generator=g)
    o = layer(x, attention_mask=mask)[0]
    assert (o[mask == 0] == 0).all()
    for b in range(B):                                   # each row's tokens as one sequence alone
        keep = mask[b].bool()
        if keep.any():
            assert_close(f'row {b}', layer(x[b:b + 1, keep])[0][0], o[b, keep], 1e-12, err_atol=0)
    # packed with cu_seqlens: the same numbers
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    if cu[-1] > 0:
        packed = layer(x[mask.bool()][None], cu_seqlens=cu)[0][0]
        assert_close('packed', o[mask.bool()], packed, 1e-12, err_atol=0)
    # causality: changing the last token changes no earlier output
    x2 = x.clone()
    x2[:, -1] += 1
    assert_close('causal', o[:, :-1], layer(x2, attention_mask=mask)[0][:, :-1], 1e-13, err_atol=0)
