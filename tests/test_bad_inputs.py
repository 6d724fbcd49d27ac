"""Bad and edge-case inputs: each gets a clear error naming the argument (checks in `myfla_gla.checks`), nothing
is silently wrong, and memory grows with the number of tokens. Property-based tests (hypothesis) draw shapes,
dtypes and `cu_seqlens`: either the result matches the float64 reference, or one of the named errors is raised."""
import ast
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import myfla_gla
from myfla_gla import (Cache, FusedLayerNormGated, FusedRMSNormGated, GatedLinearAttention, RMSNorm, ShortConvolution,
                       chunk_gla, fused_chunk_gla, fused_recurrent_gla, naive_recurrent_gla)
from myfla_gla.checks import DTypeError, InputError
from myfla_gla.models.gla import GLAConfig, GLAForCausalLM
from myfla_gla.modules.convolution import causal_conv1d
from myfla_gla.modules.norms import rms_norm_gated
from myfla_gla.ops.recurrent import reference_recurrent_gla
from myfla_gla.testing import assert_close, random_gla_inputs

F64 = torch.float64
CHUNK_OPS = {'chunk_gla': chunk_gla, 'fused_chunk_gla': fused_chunk_gla}
OPS = {**CHUNK_OPS, 'fused_recurrent_gla': lambda q, k, v, g, **kw: fused_recurrent_gla(q, k, v, g, **kw)}


def small(B=1, T=10, H=2, K=4, V=None, dtype=F64, requires_grad=False):
    return random_gla_inputs(B, T, H, K, V, dtype=dtype, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# Memory: packed sequences of very different lengths cost what their tokens cost.
# ---------------------------------------------------------------------------------------------------------------
def _peak(fn):
    from myfla_gla.bench import peak_memory
    return peak_memory(fn, 'cpu')


def _packed_vs_one(run, long=1024, ones=32):
    "Peak bytes of `run(cu_seqlens)` for one sequence of `long` tokens packed with `ones` one-token sequences, and for one sequence of the same total length."
    T = long + ones
    packed = torch.tensor([0, long] + list(range(long + 1, T + 1)))
    one = torch.tensor([0, T])
    return _peak(lambda: run(packed)), _peak(lambda: run(one))


def test_packed_recurrent_memory_grows_with_tokens():
    q, k, v, g = small(1, 1024 + 32, 2, 8, requires_grad=True, dtype=torch.float32)

    def run(cu):
        o, ht = fused_recurrent_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True)
        (o.sum() + ht.sum()).backward()
    packed, one = _packed_vs_one(run)
    # padding every sequence to the longest made the packed call ~77x the single sequence at this size
    assert packed <= 2 * one, (packed, one)


def test_packed_layer_memory_grows_with_tokens():
    layer = GatedLinearAttention(mode='fused_recurrent', hidden_size=16, num_heads=2, expand_k=1.)
    x = torch.randn(1, 1024 + 32, 16)

    def run(cu):
        with torch.no_grad():
            layer(x, cu_seqlens=cu)
    packed, one = _packed_vs_one(run)
    assert packed <= 2 * one, (packed, one)


def test_packed_recurrent_matches_reference_with_very_different_lengths():
    cu = torch.tensor([0, 0, 1, 71, 72, 72, 75])
    q, k, v, g = small(1, 75, 2, 3, 4, requires_grad=True)
    gv = torch.nn.functional.logsigmoid(torch.rand(1, 75, 2, 4, dtype=F64)).requires_grad_()
    h0 = torch.rand(6, 2, 4, 3, dtype=F64, requires_grad=True)
    for reverse in (False, True):
        kw = dict(gv=gv, initial_state=h0, output_final_state=True, reverse=reverse, state_v_first=True, cu_seqlens=cu)
        o, ht = fused_recurrent_gla(q, k, v, g, checkpoint_every=4, **kw)
        o_ref, ht_ref = reference_recurrent_gla(q, k, v, g, **kw)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        ins = (q, k, v, g, gv, h0)
        grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), ins)
        grads_ref = torch.autograd.grad((o_ref * do).sum() + (ht_ref * dht).sum(), ins)
        for name, r, x in zip(('o', 'ht', 'dq', 'dk', 'dv', 'dgk', 'dgv', 'dh0'), (o_ref, ht_ref) + grads_ref,
                              (o, ht) + grads):
            assert_close(f'{name} reverse={reverse}', r, x, 1e-12, err_atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Silently wrong before: now an error, or right.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('op', list(OPS))
def test_integer_inputs_are_rejected(op):
    q, k, v, g = small()
    with pytest.raises(TypeError, match='`q` must be a floating-point tensor, got torch.int64'):
        OPS[op]((q * 10).long(), (k * 10).long(), (v * 10).long(), g)


@pytest.mark.parametrize('norm', [lambda x: RMSNorm(4)(x), lambda x: FusedRMSNormGated(4)(x, x.float()),
                                  lambda x: FusedLayerNormGated(4)(x, x.float())])
def test_norms_reject_integers(norm):
    with pytest.raises(TypeError, match='`x` must be a floating-point tensor'):
        norm(torch.arange(8).view(2, 4))


def test_no_input_check_is_an_assert():
    "`python -O` removes asserts: no `assert` in the package may test an argument of its function."
    found = []
    for path in sorted((Path(myfla_gla.__file__).parent).rglob('*.py')):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = fn.args
                params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
                for node in ast.walk(fn):
                    if isinstance(node, ast.Assert) and params & {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}:
                        found.append(f'{path.name}:{node.lineno}')
    assert not found, f'input checks written as asserts: {found}'


def test_checks_hold_without_asserts():
    "The checks are ordinary raises: they hold with assertions disabled too (they do not depend on `__debug__`)."
    q, k, v, g = small(1, 8, 2, 4)
    for op in OPS.values():
        with pytest.raises(ValueError, match='`k` must be'):
            op(q, k[:, :7], v, g)
    with pytest.raises(ValueError, match='`initial_state` must be'):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 4, 5))


@pytest.mark.parametrize('op', list(OPS))
def test_double_backward_raises(op):
    q, k, v, g = small(requires_grad=True)
    o, _ = OPS[op](q, k, v, g)
    with pytest.raises(NotImplementedError, match='does not support double backward'):
        torch.autograd.grad((o * o).sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad((o * o).sum(), q)        # first order still works
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


def test_double_backward_where_supported():
    "The plain-PyTorch paths support second derivatives: gradgradcheck in float64."
    q, k, v, g = small(1, 3, 1, 2, 2, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *x: naive_recurrent_gla(*x)[0], (q, k, v, g))
    one = [x[:, :1].detach().requires_grad_() for x in (q, k, v, g)]   # a decoding step of fused_recurrent_gla
    assert torch.autograd.gradgradcheck(lambda *x: fused_recurrent_gla(*x)[0], one)
    x, z = torch.randn(2, 4, dtype=F64, requires_grad=True), torch.randn(2, 4, dtype=F64, requires_grad=True)
    w = torch.rand(4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, z, w: rms_norm_gated(x, z, w, None), (x, z, w))
    xc, wc = torch.randn(1, 5, 3, dtype=F64, requires_grad=True), torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: causal_conv1d(x, w, activation='silu')[0], (xc, wc))


@pytest.mark.parametrize('writer_conv', [False, True])
def test_cache_conv_state_mismatch(writer_conv):
    kw = dict(hidden_size=16, num_heads=2, layer_idx=0)
    writer = GatedLinearAttention(use_short_conv=writer_conv, **kw)
    reader = GatedLinearAttention(use_short_conv=not writer_conv, **kw)
    cache = Cache()
    writer(torch.randn(1, 5, 16), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match='short convolutions'):
        reader(torch.randn(1, 1, 16), past_key_values=cache, use_cache=True)
    writer(torch.randn(1, 1, 16), past_key_values=cache, use_cache=True)   # the matching layer reads it


@pytest.mark.parametrize('op', ['fused_chunk_gla', 'fused_recurrent_gla'])
def test_head_first_is_rejected(op):
    q, k, v, g = small()
    with pytest.raises(ValueError, match='`head_first=True` is not supported'):
        OPS[op](q, k, v, g, head_first=True)
    OPS[op](q, k, v, g, head_first=False)
    with pytest.raises(TypeError, match='head_first'):     # chunk_gla has no such argument, as in FLA 0.6.0
        chunk_gla(q, k, v, g, head_first=True)


@pytest.mark.parametrize('op', list(OPS) + ['naive'])
def test_zero_key_dim(op):
    q, k, v, g = small(1, 5, 2, 4)
    q, k, g = q[..., :0], k[..., :0], g[..., :0]
    fn = naive_recurrent_gla if op == 'naive' else OPS[op]
    with pytest.raises(ValueError, match='key dimension K >= 1'):
        fn(q, k, v, g)


def test_naive_rejects_broadcast_values():
    q, k, v, g = small(1, 5, 2, 4)
    with pytest.raises(ValueError, match='`v` must be'):
        naive_recurrent_gla(q, k, v[:, :, :1], g)


TINY = dict(hidden_size=16, num_hidden_layers=1, num_heads=2, vocab_size=10)


@pytest.mark.parametrize('kw, match', [(dict(num_hidden_layers=-1), '`num_hidden_layers` must be at least 0'),
                                       (dict(norm_eps=0.), '`norm_eps` must be > 0'),
                                       (dict(norm_eps=-1e-6), '`norm_eps` must be > 0'),
                                       (dict(vocab_size=0), '`vocab_size` must be at least 1'),
                                       (dict(num_heads=0), '`num_heads` must be at least 1'),
                                       (dict(num_heads=2.5), '`num_heads` must be an integer'),
                                       (dict(num_kv_heads=3), 'divisible by `num_kv_heads`'),
                                       (dict(expand_k=0.), r'`hidden_size \* expand_k`'),
                                       (dict(hidden_size=18, num_heads=4), r'`hidden_size \* expand_k` \(18 \* 0.5'),
                                       (dict(conv_size=0), '`conv_size` must be at least 1'),
                                       (dict(hidden_act='nope'), "`hidden_act` must be one of \\['swish', 'powlu'\\]"),
                                       (dict(feature_map='nope'), '`feature_map` must be one of'),
                                       (dict(attn_mode='chunked'), '`attn_mode` must be one of')])
def test_config_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GLAConfig(**{**TINY, **kw})


@pytest.mark.parametrize('kw, name', [(dict(num_heads=0), 'num_heads'), (dict(norm_eps=0.), 'norm_eps'),
                                      (dict(use_short_conv=True, conv_size=0), 'conv_size'),
                                      (dict(hidden_size=18, num_heads=4), 'divisible'),
                                      (dict(expand_k=0.), '`expand_k` must be > 0'),
                                      (dict(expand_v=float('inf')), '`expand_v` must be > 0 and finite'),
                                      (dict(gate_logit_normalizer=0), '`gate_logit_normalizer` must be > 0'),
                                      (dict(gate_logit_normalizer=-16), '`gate_logit_normalizer` must be > 0'),
                                      (dict(clamp_min=0.5), '`clamp_min` must be <= 0'),
                                      (dict(norm_eps=float('inf')), '`norm_eps` must be > 0 and finite'),
                                      (dict(layer_idx=-1), '`layer_idx` must be at least 0'),
                                      (dict(layer_idx='0'), '`layer_idx` must be an integer')])
def test_layer_construction(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        GatedLinearAttention(**{'hidden_size': 16, 'num_heads': 2, **kw})


def test_labels_shape():
    model = GLAForCausalLM(GLAConfig(**TINY))
    ids = torch.randint(0, 10, (2, 6))
    with pytest.raises(ValueError, match=r'`labels` must be \[batch_size, seq_len\] = \[2, 6\]'):
        model(input_ids=ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match='`labels`'):
        model(input_ids=ids, labels=ids.reshape(3, 4))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


# ---------------------------------------------------------------------------------------------------------------
# Cryptic errors before: now they name the argument.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('op', list(CHUNK_OPS))
@pytest.mark.parametrize('g', [None, [0.]])
def test_gate_not_a_tensor(op, g):
    q, k, v, _ = small()
    with pytest.raises(TypeError, match=f'`g` must be a \\[B, T, H, K\\] tensor, got {type(g).__name__}'):
        CHUNK_OPS[op](q, k, v, g)


def test_gate_list_in_recurrent():
    q, k, v, _ = small()
    with pytest.raises(TypeError, match='`gk` must be'):
        fused_recurrent_gla(q, k, v, [0.])


def test_cu_seqlens_on_another_device():
    q, k, v, g = small()
    cu = torch.tensor([0, 4, 10], device='meta')
    for call in (lambda: chunk_gla(q, k, v, g, cu_seqlens=cu), lambda: fused_chunk_gla(q, k, v, g, cu_seqlens=cu),
                 lambda: fused_recurrent_gla(q, k, v, g, cu_seqlens=cu),
                 lambda: ShortConvolution(4, 3)(torch.rand(1, 10, 4), cu_seqlens=cu),
                 lambda: GatedLinearAttention(hidden_size=16, num_heads=2)(torch.rand(1, 10, 16), cu_seqlens=cu)):
        with pytest.raises(ValueError, match="`cu_seqlens` must be on .* device cpu, got meta"):
            call()


def test_legacy_tuple_cache():
    layer = GatedLinearAttention(hidden_size=16, num_heads=2, layer_idx=0)
    with pytest.raises(TypeError, match='Cache.from_legacy_cache'):
        layer(torch.randn(1, 3, 16), past_key_values=({'recurrent_state': None},), use_cache=True)


@pytest.mark.parametrize('activation', [None, 'relu'])
def test_gated_norm_activation_fails_at_construction(activation):
    for cls in (FusedRMSNormGated, FusedLayerNormGated):
        with pytest.raises(ValueError, match='Unsupported activation'):
            cls(8, activation=activation)


@pytest.mark.parametrize('norm', [lambda x: RMSNorm(8)(x), lambda x: FusedRMSNormGated(8)(x, x)])
def test_norm_width_names_the_input(norm):
    with pytest.raises(ValueError, match=r'`x` must be \[..., hidden_size=8\], got shape \(2, 4\)'):
        norm(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------------------------
# Documented, not hidden: a NaN spreads within its 64-token chunk in the chunk ops; the recurrence stays causal.
# ---------------------------------------------------------------------------------------------------------------
def test_nan_spreads_within_its_chunk_only():
    q, k, v, g = small(1, 192, 1, 8)
    v[0, 70, 0, 0] = float('nan')
    first_nan = lambda o: o[0, :, 0].isnan().any(-1).nonzero()[0].item()
    assert first_nan(fused_recurrent_gla(q, k, v, g)[0]) == 70
    for op in CHUNK_OPS.values():
        o = op(q, k, v, g)[0]
        assert first_nan(o) == 64 and o[0, 64:].isnan().any(-1).all()


# ---------------------------------------------------------------------------------------------------------------
# Property-based: any drawn input either gives the float64 reference's result or a named error.
# ---------------------------------------------------------------------------------------------------------------
NAMED = (ValueError, TypeError)
CORRUPTIONS = ['none', 'k_len', 'v_heads', 'g_width', 'int_q', 'gate_none', 'state_n', 'cu_end', 'cu_decreasing',
               'cu_float', 'cu_batch']


@st.composite
def gla_case(draw):
    varlen = draw(st.booleans())
    H, K, V = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if varlen:
        lens = draw(st.lists(st.integers(0, 70), min_size=1, max_size=4))
        B, T, cu = 1, sum(lens), torch.tensor([0] + lens).cumsum(0)
    else:
        B, T, cu = draw(st.integers(1, 2)), draw(st.integers(0, 70)), None
    dtype = draw(st.sampled_from([F64, torch.float32]))
    with_state = draw(st.booleans())
    corruptions = CORRUPTIONS if varlen else [c for c in CORRUPTIONS if not c.startswith('cu')]
    corruption = 'none' if draw(st.booleans()) else draw(st.sampled_from(corruptions))   # half the cases valid
    return dict(B=B, T=T, H=H, K=K, V=V, cu=cu, dtype=dtype, with_state=with_state, corruption=corruption,
                seed=draw(st.integers(0, 2 ** 16)))


def _build(case):
    torch.manual_seed(case['seed'])
    B, T, H, K, V, cu, c = case['B'], case['T'], case['H'], case['K'], case['V'], case['cu'], case['corruption']
    q, k, v, g = random_gla_inputs(B, T, H, K, V, dtype=case['dtype'])
    N = B if cu is None else len(cu) - 1
    h0 = torch.rand(N, H, K, V) if case['with_state'] else None
    if case['dtype'] == F64 and h0 is not None:
        h0 = h0.double()
    bad = dict(k_len=lambda: dict(k=k[:, :-1] if T else torch.rand(B, 1, H, K)),
               v_heads=lambda: dict(v=torch.rand(B, T, H + 1, V, dtype=v.dtype)),
               g_width=lambda: dict(g=torch.rand(B, T, H, K + 1, dtype=g.dtype)),
               int_q=lambda: dict(q=(q * 4).long()),
               gate_none=lambda: dict(g=None),
               state_n=lambda: dict(initial_state=torch.rand(N + 1, H, K, V)),
               cu_end=lambda: dict(cu_seqlens=torch.cat([cu[:-1], cu[-1:] + 1])),
               cu_decreasing=lambda: dict(cu_seqlens=torch.cat([cu, cu[-1:] - 1, cu[-1:]])),
               cu_float=lambda: dict(cu_seqlens=cu.float()),
               cu_batch=lambda: dict(q=q.expand(2, -1, -1, -1), k=k.expand(2, -1, -1, -1),
                                     v=v.expand(2, -1, -1, -1), g=g.expand(2, -1, -1, -1)))
    args = dict(q=q, k=k, v=v, g=g, initial_state=h0, cu_seqlens=cu)
    if c != 'none':
        args.update(bad[c]())
    return args, (q, k, v, g, h0, cu)


@pytest.mark.parametrize('op', list(OPS))
@settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(case=gla_case())
def test_property_result_or_named_error(op, case):
    args, (q, k, v, g, h0, cu) = _build(case)
    fn = OPS[op]
    if op == 'fused_recurrent_gla' and case['corruption'] == 'gate_none':
        case = {**case, 'corruption': 'none'}        # no gate is valid for the recurrence: decay 1
        g = torch.zeros_like(g)
    try:
        o, ht = fn(args['q'], args['k'], args['v'], args['g'], initial_state=args['initial_state'],
                   output_final_state=True, cu_seqlens=args['cu_seqlens'])
    except NAMED as e:
        assert case['corruption'] != 'none', f'valid input rejected: {e}'
        assert '`' in str(e) or 'initial states' in str(e) or 'batch size' in str(e), str(e)
        return
    assert case['corruption'] == 'none', f"{case['corruption']} accepted"
    o_ref, ht_ref = reference_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ratio = 1e-12 if case['dtype'] == F64 else 1e-5
    assert_close('o', o_ref, o, ratio, err_atol=1e-6)
    assert_close('ht', ht_ref, ht, ratio, err_atol=1e-6)


@settings(max_examples=25, deadline=5000, derandomize=True)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), width=st.integers(1, 4),
       dtype=st.sampled_from([F64, torch.float32, torch.int64, torch.bool]))
def test_property_norm_result_or_named_error(shape, width, dtype):
    x = torch.randn(*shape, dtype=F64).to(dtype)
    norm = RMSNorm(width, eps=1e-6).double()
    try:
        y = norm(x)
    except NAMED as e:
        assert not x.is_floating_point() or shape[-1] != width, str(e)
        assert '`x`' in str(e), str(e)
        return
    assert x.is_floating_point() and shape[-1] == width
    ref = x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6)
    assert_close('rms_norm', ref, y, 1e-12 if dtype == F64 else 1e-6, err_atol=1e-6)
