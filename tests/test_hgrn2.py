"""HGRN2 (nbs/15_hgrn2.ipynb, nbs/15a_hgrn2_models.ipynb): the layer against its recurrence written token by token
in float64 (no GLA op), in all three modes with gradients; packed and padded input; cached decoding; the model
against a handwritten float64 stack; generation; checkpoints written by FLA; the Auto classes; bad input.
FLA parity on CUDA lives in tests/gpu/test_hgrn2_fla.py."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import cp_layer_errors, run_with_fla
from myfla_gla import Cache, HGRN2Attention, HGRN2Config, HGRN2ForCausalLM, HGRN2Model, get_err_ratio
from myfla_gla.models.gla import TRANSFORMERS_AVAILABLE

pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)
MODES = ('chunk', 'fused_chunk', 'fused_recurrent')
needs_transformers = pytest.mark.skipif(not TRANSFORMERS_AVAILABLE, reason='transformers not installed')


# ---------------------------------------------------------------------------------------------------------------
# the recurrence, one token at a time


def conv_reference(x, conv):
    "Causal depthwise convolution of x [B, T, C] with `conv`'s [C, 1, W] weight (no activation), as a sum of shifts."
    W, T = conv.weight.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, W - 1, 0))
    y = sum(conv.weight[:, 0, j] * xp[:, j:j + T] for j in range(W))
    return y if conv.bias is None else y + conv.bias


def layer_reference(layer, x, lower_bound=None):
    "HGRN2 on x [B, T, D] from its equations: (output [B, T, D], final state [B, H, K, V])."
    H, K, V = layer.num_heads, layer.head_f_dim, layer.head_i_dim
    q, f, i = layer.q_proj(x), layer.f_proj(x), layer.i_proj(x)
    if layer.use_short_conv:
        q, f, i = (conv_reference(a, c) for a, c in zip((q, f, i), (layer.q_conv1d, layer.f_conv1d, layer.i_conv1d)))
    q = (q * torch.sigmoid(q)).unflatten(-1, (H, K))
    forget = torch.sigmoid(f)
    if lower_bound is not None and layer.layer_idx > 0:
        forget = lower_bound + (1 - lower_bound) * forget
    forget, i = forget.unflatten(-1, (H, K)), i.unflatten(-1, (H, V))
    S, out = x.new_zeros(x.shape[0], H, K, V), []
    for t in range(x.shape[1]):
        S = forget[:, t, :, :, None] * S + (1 - forget[:, t, :, :, None]) * i[:, t, :, None, :]
        out.append(torch.einsum('bhk,bhkv->bhv', q[:, t] * K ** -0.5, S).flatten(-2))
    o = torch.stack(out, 1)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)   # FLA normalises with eps 1e-5
    if layer.g_norm.weight is not None:
        o = o * layer.g_norm.weight
    return layer.o_proj(o), S


def make_layer(mode='chunk', seed=0, layer_idx=1, **kw):
    "A float64 layer with random weights everywhere (the norm's weight and conv biases too)."
    torch.manual_seed(seed)
    layer = HGRN2Attention(mode, hidden_size=kw.pop('hidden_size', 32), expand_ratio=kw.pop('expand_ratio', 8),
                           layer_idx=layer_idx, **kw).double()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if 'norm' in n or n.endswith('bias'):
                p.uniform_(0.5, 1.5)
    return layer


def grads(out, leaves, seed=1):
    torch.manual_seed(seed)
    return torch.autograd.grad((out * torch.randn_like(out)).sum(), leaves)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('T', [9, 70])   # the recurrent path (<= 64 tokens) and the mode's own
@pytest.mark.parametrize('conv', [False, True])
def test_layer_matches_the_recurrence(mode, T, conv):
    "Output, final state and every gradient (input, parameters, lower bound) against the token-by-token recurrence."
    layer = make_layer(mode, use_short_conv=conv, conv_size=3, conv_bias=conv)
    torch.manual_seed(2)
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    bound = (torch.rand(32, dtype=torch.float64) * 0.9).requires_grad_()
    o, _, cache = layer(x, lower_bound=bound, past_key_values=Cache(), use_cache=True)
    ref, S = layer_reference(layer, x, bound)
    assert get_err_ratio(ref, o) < 1e-12
    state = cache[1]['recurrent_state']
    assert state.shape == (2, 4, 8, 8) and get_err_ratio(S.transpose(-1, -2), state) < 1e-12   # [N, H, V, K]
    leaves = [x, bound, *layer.parameters()]
    for a, b in zip(grads(ref, leaves), grads(o, leaves)):
        assert get_err_ratio(a, b) < 1e-11


def test_the_first_layer_has_no_bound_and_without_one_the_gates_are_plain():
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    bound = torch.full((32,), 0.5, dtype=torch.float64)
    first = make_layer(layer_idx=0)
    with torch.no_grad():
        assert torch.equal(first(x, lower_bound=bound)[0], first(x)[0])
        assert get_err_ratio(layer_reference(first, x)[0], first(x)[0]) < 1e-12
        second = make_layer(layer_idx=1)
        assert get_err_ratio(second(x, lower_bound=bound)[0], second(x)[0]) > 0.01


def test_num_heads_and_expand_ratio_as_fla():
    "FLA's rule: `expand_ratio` sets the heads; `num_heads` only without it. Sizes, parameter shapes, state size."
    a = HGRN2Attention(hidden_size=64, num_heads=2, expand_ratio=16)
    assert (a.num_heads, a.head_f_dim, a.head_i_dim, a.forget_dim) == (4, 16, 16, 64)
    b = HGRN2Attention(hidden_size=64, num_heads=2, expand_ratio=None, use_short_conv=True, conv_size=3)
    assert (b.num_heads, b.expand_ratio, b.head_i_dim) == (2, 32, 32)
    assert {n: tuple(p.shape) for n, p in b.named_parameters()} == {
        'q_proj.weight': (64, 64), 'f_proj.weight': (64, 64), 'i_proj.weight': (64, 64),
        'q_conv1d.weight': (64, 1, 3), 'f_conv1d.weight': (64, 1, 3), 'i_conv1d.weight': (64, 1, 3),
        'g_norm.weight': (64,), 'o_proj.weight': (64, 64)}
    assert b.g_norm.weight.dtype == torch.float32 and b.state_size() == 64 * 32 + 3 * 64 * 3
    assert HGRN2Attention(hidden_size=64, expand_ratio=16, elementwise_affine=False).g_norm.weight is None


def test_packed_sequences_equal_each_alone():
    layer = make_layer('chunk', use_short_conv=True, conv_size=4)
    torch.manual_seed(3)
    lens = [70, 5, 30]
    xs = [torch.randn(1, n, 32, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 70, 75, 105])
    bound = torch.rand(32, dtype=torch.float64) * 0.9
    with torch.no_grad():
        packed, _, cache = layer(torch.cat(xs, 1), lower_bound=bound, cu_seqlens=cu, past_key_values=Cache(),
                                 use_cache=True)
        for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone, _, c = layer(xs[n], lower_bound=bound, past_key_values=Cache(), use_cache=True)
            assert get_err_ratio(alone, packed[:, s:e]) < 1e-12
            assert get_err_ratio(c[1]['recurrent_state'][0], cache[1]['recurrent_state'][n]) < 1e-12
            for a, b in zip(c[1]['conv_state'], cache[1]['conv_state']):   # projections of fewer rows: to rounding
                torch.testing.assert_close(a[0], b[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('T', [10, 70])
def test_padding_mask(T):
    "A left-padded row gives the sequence alone, and exact zeros at the padding; a right-padded one too."
    layer = make_layer('chunk', use_short_conv=True, conv_size=3)
    torch.manual_seed(4)
    x = torch.randn(3, T, 32, dtype=torch.float64)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, -3:] = 0
    with torch.no_grad():
        o = layer(x, attention_mask=mask)[0]
        assert get_err_ratio(layer(x[:1, 4:])[0], o[:1, 4:]) < 1e-12
        assert get_err_ratio(layer(x[2:, :-3])[0], o[2:, :-3]) < 1e-12
        assert get_err_ratio(layer(x[1:2])[0], o[1:2]) < 1e-12
        assert not o[0, :4].any() and not o[2, -3:].any()


@pytest.mark.parametrize('mode', MODES)
def test_cached_decoding_equals_one_pass(mode):
    "A 70-token prompt (the mode's path), then single tokens and a short chunk: the one-pass output and state."
    layer = make_layer(mode, use_short_conv=True, conv_size=4)
    torch.manual_seed(5)
    x = torch.randn(2, 80, 32, dtype=torch.float64)
    bound = torch.rand(32, dtype=torch.float64) * 0.9
    with torch.no_grad():
        whole, _, full = layer(x, lower_bound=bound, past_key_values=Cache(), use_cache=True)
        cache = Cache()
        parts = [layer(x[:, :70], lower_bound=bound, past_key_values=cache, use_cache=True)[0]]
        parts += [layer(x[:, t:t + 1], lower_bound=bound, past_key_values=cache, use_cache=True)[0] for t in (70, 71)]
        parts.append(layer(x[:, 72:], lower_bound=bound, past_key_values=cache, use_cache=True)[0])
    assert get_err_ratio(whole, torch.cat(parts, 1)) < 1e-12
    assert get_err_ratio(full[1]['recurrent_state'], cache[1]['recurrent_state']) < 1e-12
    assert cache.get_seq_length(1) == 80
    with torch.no_grad():   # use_cache=False reads the cache and leaves it as it was
        before = {k: v.clone() for k, v in zip(('s', 'q', 'f', 'i'), (cache[1]['recurrent_state'], *cache[1]['conv_state']))}
        layer(x[:, :1], lower_bound=bound, past_key_values=cache, use_cache=False)
        after = (cache[1]['recurrent_state'], *cache[1]['conv_state'])
    assert all(torch.equal(a, b) for a, b in zip(before.values(), after))


def test_a_cache_record_of_the_other_kind_of_layer_is_refused():
    "A record written with short convolutions, read by a layer without them (and the reverse): an error that says so."
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    with_conv, without = make_layer(use_short_conv=True), make_layer()
    for writer, reader in ((with_conv, without), (without, with_conv)):
        cache = Cache()
        with torch.no_grad():
            writer(x, past_key_values=cache, use_cache=True)
            with pytest.raises(ValueError, match='short convolutions'):
                reader(x[:, :1], past_key_values=cache, use_cache=True)


def test_mixed_precision_under_autocast():
    "bf16 autocast on the CPU: output in bf16, within bf16 rounding of float32."
    layer = make_layer('chunk', use_short_conv=True).float()
    x = torch.randn(2, 70, 32)
    bound = torch.rand(32) * 0.9
    with torch.no_grad():
        ref = layer(x, lower_bound=bound)[0]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            o = layer(x, lower_bound=bound)[0]
    assert o.dtype == torch.bfloat16 and get_err_ratio(ref, o.float()) < 2e-2


def cp_case(rank, world):
    """Each rank's share of a packed batch with `cp_context`: the layer (output, every gradient) and the model (loss).
    Run by tests/test_cp.py in its group of gloo processes (a group costs seconds to start)."""
    import torch.distributed as dist
    from myfla_gla.ops.cp import build_cp_context
    torch.set_num_threads(1)
    errs = {}
    for mode, cu in (('chunk', [0, 30, 96, 140]), ('fused_recurrent', [0, 7, 40, 48])):
        layer = make_layer(mode, use_short_conv=True, conv_size=3)
        torch.manual_seed(7)
        bound = torch.rand(32, dtype=torch.float64) * 0.9
        layer_errs = cp_layer_errors(layer, rank, world, cu, conv1d_kernel_size=3, lower_bound=bound)[0]
        errs.update({(mode, n): e for n, e in layer_errs.items()})
    model, cu = model_of(use_short_conv=True), [0, 9, 40, 48]
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(8))
    loss = model(ids, labels=ids, cu_seqlens=torch.tensor(cu)).loss
    sl = slice(rank * 48 // world, (rank + 1) * 48 // world)
    part = model(ids[:, sl], labels=ids[:, sl], cp_context=build_cp_context(torch.tensor(cu), None)).loss.detach()
    dist.all_reduce(part)
    errs['model', 'loss'] = abs(part.item() - loss.item()) / loss.item()
    return errs


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_layer_arguments_are_named():
    with pytest.raises(ValueError, match='expand_ratio'):
        HGRN2Attention(hidden_size=32, expand_ratio=64)
    with pytest.raises(ValueError, match='num_heads'):
        HGRN2Attention(hidden_size=30, num_heads=4, expand_ratio=None)
    with pytest.raises(RuntimeError, match='One of `expand_ratio` or `num_heads`'):
        HGRN2Attention(hidden_size=32, expand_ratio=None)
    with pytest.raises(AssertionError, match='Not supported mode'):
        HGRN2Attention('parallel', hidden_size=32, expand_ratio=8)
    with pytest.raises(TypeError, match='conv_size'):
        HGRN2Attention(hidden_size=32, expand_ratio=8, use_short_conv=True, conv_size=2.5)
    with pytest.raises(ValueError, match='norm_eps'):
        HGRN2Attention(hidden_size=32, expand_ratio=8, norm_eps=0)


def test_bad_forward_inputs_are_named():
    layer = make_layer()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match='lower_bound.*K=32'):
        layer(x, lower_bound=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match='lower_bound'):
        layer(x, lower_bound=0.5)
    with pytest.raises(ValueError, match='layer_idx'):
        make_layer(layer_idx=None)(x, lower_bound=torch.zeros(32, dtype=torch.float64))
    with pytest.raises(ValueError, match='requires `layer_idx`'):   # FLA's message
        make_layer(layer_idx=None)(x, past_key_values=Cache())
    with pytest.raises(ValueError, match='hidden_states'):
        layer(x[0])
    with pytest.raises(AssertionError, match='Arbitrary attention masks'):
        layer(x, attention_mask=torch.ones(1, 6, 6))
    with pytest.warns(UserWarning, match='ignores the keyword argument `cu_seqlen`; did you mean `cu_seqlens`'):
        layer(x, cu_seqlen=torch.tensor([0, 6]))


# ---------------------------------------------------------------------------------------------------------------
# the model


def tiny(**kw):
    return HGRN2Config(**{**dict(hidden_size=32, num_hidden_layers=3, expand_ratio=8, vocab_size=64,
                                 intermediate_size=48, bos_token_id=None, eos_token_id=None), **kw})


def model_of(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = HGRN2ForCausalLM(tiny(**kw)).to(dtype).eval()
    if getattr(model.config, 'use_lower_bound', False):
        with torch.no_grad():
            model.model.lower_bounds.normal_()
    return model


def model_reference(model, ids):
    "The logits from the embeddings, the blocks with `layer_reference` and the head; the bounds from their formula."
    m = model.model
    h = m.embeddings(ids)
    bounds = [None] * len(m.layers)
    if model.config.use_lower_bound:
        p = torch.softmax(m.lower_bounds, 0)
        bounds = [p[1:l + 1].sum(0) for l in range(len(m.layers))]
    for layer, b in zip(m.layers, bounds):
        h = h + layer_reference(layer.attn, layer.attn_norm(h), b)[0]
        h = h + layer.mlp(layer.mlp_norm(h))
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize('kw', [{}, dict(use_short_conv=True, attn_mode='fused_recurrent'),
                                dict(use_lower_bound=False, fuse_norm=False), dict(attnres_block_size=2)],
                         ids=['default', 'conv_recurrent', 'no_bound_unfused', 'attnres'])
def test_model_matches_the_handwritten_stack(kw):
    "Logits and the gradient of the bounds against the float64 stack (70 tokens: the chunk path)."
    model = model_of(**kw)
    ids = torch.randint(0, 64, (2, 70))
    out = model(ids).logits
    if kw.get('attnres_block_size'):   # the stack above has no attention residuals: compare with FLA's formula only
        assert torch.isfinite(out).all()
        return
    ref = model_reference(model, ids)
    assert get_err_ratio(ref, out) < 1e-12
    if model.config.use_lower_bound:
        a, b = (grads(o, [model.model.lower_bounds])[0] for o in (ref, out))
        assert get_err_ratio(a, b) < 1e-11 and b.abs().sum() > 0


def test_parameter_names_and_bounds_are_flas():
    model = HGRN2ForCausalLM(tiny(use_short_conv=True))
    names = set(model.state_dict())
    assert {'model.embeddings.weight', 'model.lower_bounds', 'model.norm.weight', 'lm_head.weight',
            'model.layers.2.attn.q_conv1d.weight', 'model.layers.0.attn.g_norm.weight'} <= names
    assert not model.model.lower_bounds.any() and model.model.lower_bounds.shape == (3, 32)
    assert 'model.lower_bounds' not in HGRN2ForCausalLM(tiny(use_lower_bound=False)).state_dict()
    bounds = torch.stack([kw['lower_bound'] for kw in model.model._per_layer_kwargs()])
    assert torch.allclose(bounds[:, 0], torch.tensor([0., 1 / 3, 2 / 3])) and bounds.dtype == torch.float32


def test_model_packed_padded_and_cached():
    "Packed rows equal each sequence alone; a left-padded row equals its tokens alone; a cache continues one pass."
    model = model_of(use_short_conv=True)
    torch.manual_seed(6)
    a, b = torch.randint(0, 64, (1, 9)), torch.randint(0, 64, (1, 70))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 9, 79])).logits
        assert get_err_ratio(model(a).logits, packed[:, :9]) < 1e-12
        assert get_err_ratio(model(b).logits, packed[:, 9:]) < 1e-12
        ids = torch.cat([torch.zeros(1, 61, dtype=torch.long), a], 1)
        mask = (torch.arange(70) >= 61).long()[None]
        assert get_err_ratio(model(a).logits, model(ids, attention_mask=mask).logits[:, 61:]) < 1e-12
        whole = model(b).logits
        cache = Cache()
        first = model(b[:, :66], past_key_values=cache, use_cache=True).logits
        rest = [model(b[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(66, 70)]
    assert get_err_ratio(whole, torch.cat([first, *rest], 1)) < 1e-12


def test_output_attentions_is_refused_by_name():
    with pytest.warns(UserWarning, match='`HGRN2Model` does not `output_attentions`'):
        out = model_of()(torch.randint(0, 64, (1, 5)), output_attentions=True)
    assert out.attentions is None


@needs_transformers
def test_generate_with_and_without_the_cache():
    "transformers' `generate`, greedy: the cache gives the tokens of re-running the sequence, and of argmax by hand."
    model = model_of(use_short_conv=True)
    prompt = torch.randint(0, 64, (2, 7))
    a = model.generate(prompt, max_new_tokens=6, do_sample=False)
    b = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(a, b) and torch.equal(a, ids)


@needs_transformers
def test_export_refuses_hgrn2_by_name():
    from myfla_gla.checks import InputError
    from myfla_gla.export import DecodeStep
    with pytest.raises(InputError, match='HGRN2Attention'):
        DecodeStep(model_of(torch.float32))


def test_auto_classes_and_save_load(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    assert type(AutoConfig.for_model('hgrn2', hidden_size=32, expand_ratio=8)) is HGRN2Config
    assert type(AutoModel.from_config(tiny())) is HGRN2Model
    model = model_of(torch.float32)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'hgrn2'
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is HGRN2ForCausalLM
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_config_is_flas_and_checks_its_fields():
    c = HGRN2Config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.expand_ratio, c.use_lower_bound, c.norm_eps,
            c.attn_mode, c.conv_size, c.hidden_ratio, c.vocab_size) == (2048, 24, 16, 128, True, 1e-6, 'chunk', 4, 4, 32000)
    assert HGRN2Config(hidden_size=64, num_heads=4, expand_ratio=None).expand_ratio == 16
    with pytest.raises(RuntimeError, match='One of `expand_ratio` or `num_heads`'):
        HGRN2Config(expand_ratio=None)
    for kw, field in ((dict(attn_mode='parallel'), 'attn_mode'), (dict(norm_eps=-1.), 'norm_eps'),
                      (dict(expand_ratio=48), 'expand_ratio'), (dict(hidden_act='gelu'), 'hidden_act'),
                      (dict(pad_token_id=64), 'pad_token_id'), (dict(attnres_block_size=3), 'attnres_block_size'),
                      (dict(attn={'layers': [5], 'num_heads': 2}), 'layers'),
                      (dict(fuse_linear_cross_entropy=True), 'fuse_linear_cross_entropy')):
        with pytest.raises(ValueError, match=field):
            tiny(**kw)


def test_block_passes_the_bound_to_its_layer_only(monkeypatch):
    "FLA's block signature: `lower_bound` (default False, no bound) reaches the HGRN2 layer, not the MLP."
    model = model_of()
    block = model.model.layers[1]
    h = torch.randn(1, 5, 32, dtype=torch.float64)
    bound = torch.full((32,), 0.7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # the MLP would warn about a keyword it does not read
        with torch.no_grad():
            plain, with_bound = block(h)[0], block(h, lower_bound=bound)[0]
    assert torch.equal(plain, block(h, lower_bound=None)[0]) and get_err_ratio(plain, with_bound) > 1e-3


def test_hybrid_attention_layers():
    "FLA's `attn=` layers are its softmax `Attention` (myfla_gla.layers.attn): built, decoded with the cache."
    from myfla_gla.layers.attn import Attention
    model = model_of(attn={'layers': [1], 'num_heads': 2, 'num_kv_heads': 1})
    assert isinstance(model.model.layers[1].attn, Attention)
    assert {'model.layers.1.attn.q_proj.weight', 'model.layers.1.attn.k_proj.weight',
            'model.layers.1.attn.o_proj.weight'} <= set(model.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        whole = model(ids).logits
        cache = Cache()
        parts = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        parts += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(8, 12)]
    assert get_err_ratio(whole, torch.cat(parts, 1)) < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# checkpoints written by FLA


FLA_WRITER = '''
    torch.manual_seed(0)
    config = HGRN2Config(hidden_size=32, num_hidden_layers=3, expand_ratio=8, vocab_size=64, intermediate_size=48,
                         use_short_conv=True, bos_token_id=None, eos_token_id=None)
    model = HGRN2ForCausalLM(config)
    with torch.no_grad():             # FLA starts them at zero: make them matter
        model.model.lower_bounds.normal_()
    model.save_pretrained(sys.argv[1])
    from transformers import AutoConfig
    print(json.dumps({'AutoConfig': type(AutoConfig.for_model('hgrn2')).__module__.split('.')[0],
                      'use_lower_bound': config.use_lower_bound}))
'''


@needs_transformers
def test_checkpoint_written_by_fla(tmp_path):
    "FLA's HGRN2ForCausalLM (built on the CPU, its kernels never run) saves; ours loads it strict, logits as the stack."
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = run_with_fla('from fla.models import HGRN2Config, HGRN2ForCausalLM', FLA_WRITER, tmp_path)
    written = json.loads(out.strip().splitlines()[-1])
    assert written['AutoConfig'] == 'fla'   # with both imported, the last registration wins
    stored = load_file(tmp_path / 'model.safetensors')
    for load in (HGRN2ForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        model = load(tmp_path)
        assert type(model) is HGRN2ForCausalLM
        assert set(model.state_dict()) == set(stored)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert stored['model.lower_bounds'].abs().sum() > 0
    ours = model.config.to_dict()
    for k, v in json.loads((tmp_path / 'config.json').read_text()).items():   # every field FLA wrote, as FLA wrote it
        if k not in ('transformers_version', 'architectures', 'dtype'):
            assert ours.get(k) == v, (k, ours.get(k), v)
    assert written['use_lower_bound'] is True
    fresh = HGRN2ForCausalLM(model.config)
    fresh.load_state_dict(stored, strict=True)
    model = model.double().eval()
    ids = torch.randint(0, 64, (2, 70))
    with torch.no_grad():
        assert get_err_ratio(model_reference(model, ids), model(ids).logits) < 1e-12
