"""The GLA model stack (nbs/10_models.ipynb): FLA's config and parameter names, initialisation, loss, caches,
left-padded generation, packed input, transformers integration, and the plain path without transformers.
FLA parity on CUDA lives in tests/gpu/test_models_fla.py."""
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from myfla_gla import Cache, GLABlock, GLAConfig, GLAForCausalLM, GLAModel, GatedMLP, assert_close
from myfla_gla import checks
from myfla_gla.models import gla as models_gla
from myfla_gla.models.gla import TRANSFORMERS_AVAILABLE, l2_warp, simple_generate

root = Path(__file__).resolve().parent.parent
needs_transformers = pytest.mark.skipif(not TRANSFORMERS_AVAILABLE, reason='transformers not installed')


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


def tiny(**kw):
    "A small model config; float64 models built from it agree with themselves to rounding."
    base = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, intermediate_size=48,
                bos_token_id=None, eos_token_id=None)
    return GLAConfig(**{**base, **kw})


def model_of(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return GLAForCausalLM(tiny(**kw)).to(dtype).eval()


# configurations that change the layer's structure or its cache
CONFIGS = {
    'default': {},
    'short_conv': dict(use_short_conv=True, conv_size=3),
    'gqa_conv_bias': dict(num_heads=4, num_kv_heads=2, use_short_conv=True, conv_bias=True),
    'no_gate_unfused': dict(use_output_gate=False, fuse_norm=False, clamp_min=-0.05, feature_map='relu'),
    'recurrent_mode': dict(attn_mode='fused_recurrent', expand_k=1.0, gate_logit_normalizer=2),
    'attnres': dict(attnres_block_size=2, use_short_conv=True, num_hidden_layers=3),
}


# ---------------------------------------------------------------------------------------------------------------
# configuration


def test_config_defaults_are_flas():
    c = GLAConfig()
    expected = dict(hidden_size=2048, expand_k=0.5, expand_v=1.0, hidden_ratio=4, intermediate_size=None,
                    num_hidden_layers=24, num_heads=4, num_kv_heads=None, feature_map=None, attn_mode='chunk',
                    use_short_conv=False, conv_size=4, use_output_gate=True, clamp_min=None, hidden_act='swish',
                    max_position_embeddings=2048, elementwise_affine=True, norm_eps=1e-6, use_gk=True, use_gv=False,
                    attn=None, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=False, initializer_range=0.02, fuse_norm=True, fuse_swiglu=True,
                    fuse_cross_entropy=True, fuse_linear_cross_entropy=False, use_l2warp=False, vocab_size=32000,
                    attnres_block_size=None)
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.model_type == 'gla' and c.keys_to_ignore_at_inference == ['past_key_values']


def test_config_validation():
    with pytest.raises(ValueError, match='cannot be True at the same time'):
        GLAConfig(fuse_linear_cross_entropy=True)
    with pytest.warns(UserWarning, match='fuse_linear_cross_entropy'):
        GLAConfig(fuse_cross_entropy=False, fuse_linear_cross_entropy=True)
    for bad in (0, 3, 5, -2, 2.0, True):
        with pytest.raises(ValueError, match='attnres_block_size'):
            GLAConfig(attnres_block_size=bad)
    for ok in (None, 1, 2, 8):
        assert GLAConfig(attnres_block_size=ok).attnres_block_size == ok


@pytest.mark.parametrize('attn, match', [
    ('layers', 'dictionary'),
    ({'num_heads': 2}, "'layers'"),
    ({'layers': [0]}, "'num_heads'"),
    ({'layers': [0, 0], 'num_heads': 2}, 'twice'),
    ({'layers': [4], 'num_heads': 2}, 'outside'),
    ({'layers': [True], 'num_heads': 2}, 'integer'),
    ({'layers': [0], 'num_heads': 0}, 'positive'),
    ({'layers': [0], 'num_heads': 2, 'qkv_bias': 1}, 'bool'),
    ({'layers': [0], 'num_heads': 2, 'window_size': -1}, 'window_size'),
    ({'layers': [0], 'num_heads': 2, 'window_size': 0}, 'window_size'),
    ({'layers': [0], 'num_heads': 4, 'num_kv_heads': 3}, "'num_kv_heads' \\(3\\) must divide"),
    ({'layers': [0], 'num_heads': 2, 'rope_theta': float('inf')}, 'rope_theta'),
    ([{'layers': [0], 'num_heads': 2}, {'layers': [0, 1], 'num_heads': 2}], 'index 1'),
])
def test_hybrid_attn_spec_validation(attn, match):
    with pytest.raises(ValueError, match=match):
        GLAConfig(num_hidden_layers=4, attn=attn)


def test_hybrid_attn_spec_normalised_and_revalidated_on_assignment():
    c = GLAConfig(num_hidden_layers=4, attn=[{'layers': (0,), 'num_heads': 2, 'extra': 1}, {'layers': [3], 'num_heads': 4, 'num_kv_heads': 2}])
    assert c.attn == [{'layers': [0], 'num_heads': 2, 'extra': 1, 'num_kv_heads': 2, 'qkv_bias': False, 'window_size': None, 'rope_theta': 10000.},
                      {'layers': [3], 'num_heads': 4, 'num_kv_heads': 2, 'qkv_bias': False, 'window_size': None, 'rope_theta': 10000.}]
    with pytest.raises(ValueError, match='outside'):
        c.attn = {'layers': [9], 'num_heads': 2}
    assert c.to_dict()['attn'][1]['layers'] == [3]


def test_unported_features_raise_clearly():
    with pytest.raises(ValueError, match='hidden_act'):
        GatedMLP(32, hidden_act='gelu')


INF, NAN = float('inf'), float('nan')
# every numeric field of GLAConfig, outside its domain, not finite, or not a number
BAD_FIELDS = [
    ('hidden_size', 0, ValueError), ('hidden_size', 2.5, TypeError), ('num_hidden_layers', -1, ValueError),
    ('num_heads', 0, ValueError), ('vocab_size', 0, ValueError), ('conv_size', 0, ValueError),
    ('gate_low_rank_dim', 0, ValueError), ('num_kv_heads', 0, ValueError), ('intermediate_size', 0, ValueError),
    ('intermediate_size', 2.5, TypeError), ('max_position_embeddings', 0, ValueError),
    ('hidden_ratio', 0, ValueError), ('hidden_ratio', INF, ValueError), ('hidden_ratio', NAN, ValueError),
    ('hidden_ratio', '4', TypeError), ('norm_eps', 0., ValueError), ('norm_eps', INF, ValueError),
    ('norm_eps', NAN, ValueError), ('gate_logit_normalizer', 0, ValueError), ('gate_logit_normalizer', -16, ValueError),
    ('gate_logit_normalizer', INF, ValueError), ('gate_logit_normalizer', NAN, ValueError),
    ('gate_logit_normalizer', None, TypeError), ('clamp_min', 0.5, ValueError), ('clamp_min', NAN, ValueError),
    ('clamp_min', -INF, ValueError), ('initializer_range', -0.02, ValueError), ('initializer_range', NAN, ValueError),
    ('initializer_range', INF, ValueError), ('expand_k', NAN, ValueError), ('expand_v', INF, ValueError),
    ('expand_k', True, TypeError), ('pad_token_id', 64, ValueError), ('pad_token_id', -65, ValueError),
    ('pad_token_id', 1.0, TypeError)]


@pytest.mark.parametrize('field, value, error', BAD_FIELDS)
def test_config_fields_that_cannot_work_are_refused(field, value, error):
    with pytest.raises(error, match=f'`{field}`'):
        tiny(**{field: value})


def test_config_fields_at_the_edges_of_their_domains_work():
    "The edges stay valid: no clamp of 0 (log decay 0 allowed), std 0, one layer of padding ids, no layers."
    for kw in (dict(clamp_min=0.), dict(clamp_min=-0.05, gate_logit_normalizer=1e-3), dict(initializer_range=0),
               dict(hidden_ratio=2.5, intermediate_size=None), dict(pad_token_id=-1), dict(pad_token_id=63),
               dict(num_hidden_layers=0), dict(max_position_embeddings=None)):
        torch.manual_seed(0)
        out = GLAForCausalLM(tiny(**kw))(torch.randint(0, 64, (1, 5))).logits
        assert out.shape == (1, 5, 64) and torch.isfinite(out).all(), kw
    c = GLAConfig()     # FLA's defaults (test_config_defaults_are_flas); configs FLA writes: tests/test_dropin.py
    assert GLAConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_gated_mlp_checks_its_sizes():
    for kw, error in ((dict(hidden_ratio=INF), ValueError), (dict(hidden_ratio=0), ValueError),
                      (dict(intermediate_size=0), ValueError), (dict(powglu_power=NAN), ValueError),
                      (dict(hidden_ratio='4'), TypeError)):
        with pytest.raises(error, match=f'`{next(iter(kw))}`'):
            GatedMLP(32, **kw)


# ---------------------------------------------------------------------------------------------------------------
# parameters and initialisation


def test_parameter_names_are_flas():
    m = GLAForCausalLM(tiny(use_short_conv=True, conv_bias=True, fuse_norm=False, use_output_gate=True, hidden_act='swish'))
    names = set(m.state_dict())
    layer = ['attn_norm.weight', 'attn.q_proj.weight', 'attn.k_proj.weight', 'attn.v_proj.weight', 'attn.g_proj.weight',
             'attn.gk_proj.0.weight', 'attn.gk_proj.1.weight', 'attn.gk_proj.1.bias', 'attn.o_proj.weight',
             'attn.q_conv1d.weight', 'attn.k_conv1d.weight', 'attn.v_conv1d.weight', 'attn.q_conv1d.bias',
             'attn.k_conv1d.bias', 'attn.v_conv1d.bias', 'attn.g_norm.weight', 'mlp_norm.weight',
             'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight']
    expected = {'model.embeddings.weight', 'model.norm.weight', 'lm_head.weight'} | {f'model.layers.{i}.{k}' for i in range(2) for k in layer}
    assert names == expected
    fused = set(GLAForCausalLM(tiny()).state_dict())
    assert 'model.layers.0.attn.g_norm_swish_gate.weight' in fused and 'model.layers.0.attn.q_conv1d.weight' not in fused
    assert isinstance(m.model.norm, nn.RMSNorm) and not isinstance(GLAModel(tiny()).norm, nn.RMSNorm)
    assert [b.attn.layer_idx for b in m.model.layers] == [0, 1] and [b.layer_idx for b in m.model.layers] == [0, 1]


@pytest.mark.parametrize('fuse_norm', [True, False])
def test_forward_matches_a_handwritten_stack(fuse_norm):
    "The wiring of FLA's model, written out: pre-norm residual blocks, SwiGLU, final norm, head (float64)."
    m = model_of(fuse_norm=fuse_norm, use_short_conv=True, norm_eps=1e-3)
    for p in m.parameters():   # make the norm weights matter
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (2, 9))
    rms = lambda x, w: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-3) * w
    h = m.model.embeddings.weight[ids]
    for block in m.model.layers:
        h = h + block.attn(rms(h, block.attn_norm.weight))[0]
        x = rms(h, block.mlp_norm.weight)
        h = h + block.mlp.down_proj(F.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))
    logits = rms(h, m.model.norm.weight) @ m.lm_head.weight.T
    assert_close('handwritten stack', logits, m(ids).logits, 1e-12, err_atol=0)


def test_attnres_parameters_and_init():
    m = GLAForCausalLM(tiny(attnres_block_size=2, num_hidden_layers=3))
    names = set(m.state_dict())
    for key in ('model.res_proj.weight', 'model.res_norm.weight', 'model.layers.2.attn_res_proj.weight',
                'model.layers.2.attn_res_norm.weight', 'model.layers.0.mlp_res_proj.weight', 'model.layers.0.mlp_res_norm.weight'):
        assert key in names, key
        w = m.state_dict()[key]
        assert torch.equal(w, torch.zeros_like(w) if 'proj' in key else torch.ones_like(w)), key
    assert [(b.attnres_is_attn_boundary, b.attnres_is_mlp_boundary) for b in m.model.layers] == [(True, False)] * 3
    b4 = GLAModel(tiny(attnres_block_size=4, num_hidden_layers=3)).layers
    assert [(b.attnres_is_attn_boundary, b.attnres_is_mlp_boundary) for b in b4] == [(True, False), (False, False), (True, False)]
    assert 'model.res_proj.weight' not in set(GLAForCausalLM(tiny()).state_dict())


@pytest.mark.parametrize('block_size', [1, 2, 4])
def test_attnres_forward_matches_a_handwritten_stack(block_size):
    "Attention residuals written out: sources are closed at block boundaries, every sublayer input is a depth softmax."
    m = model_of(attnres_block_size=block_size, num_hidden_layers=3, fuse_norm=False)
    for n, p in m.named_parameters():   # non-trivial queries and norms
        if 'res_proj' in n or p.dim() == 1:
            p.data.normal_(0.5, 0.5)
    ids = torch.randint(0, 64, (2, 9))
    eps = m.config.norm_eps
    rms = lambda x, w: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w

    def mix(q, norm_w, sources, out_w):
        v = torch.stack(sources)
        p = (rms(v, norm_w) @ q.reshape(-1)).softmax(0)
        return rms((p[..., None] * v).sum(0), out_w)

    # sublayer s (attention 2i, MLP 2i+1): at every multiple of the block size the running partial sum becomes
    # a source; the sublayer's input mixes the sources and the open partial sum; its output joins the partial sum
    sources, partial = [m.model.embeddings.weight[ids]], None
    sublayers = [(b, kind) for b in m.model.layers for kind in ('attn', 'mlp')]
    for s_idx, (block, kind) in enumerate(sublayers):
        if s_idx % block_size == 0 and partial is not None:
            sources, partial = sources + [partial], None
        pre = getattr(block, f'{kind}_norm')
        if s_idx == 0:
            x = rms(sources[0], pre.weight)
        else:
            x = mix(getattr(block, f'{kind}_res_proj').weight, getattr(block, f'{kind}_res_norm').weight,
                    sources + ([partial] if partial is not None else []), pre.weight)
        out = block.attn(x)[0] if kind == 'attn' else block.mlp(x)
        partial = out if partial is None else partial + out
    final = sources + ([partial] if partial is not None else [])
    logits = mix(m.model.res_proj.weight, m.model.res_norm.weight, final, m.model.norm.weight) @ m.lm_head.weight.T
    assert_close(f'attnres stack (block size {block_size})', logits, m(ids).logits, 1e-12, err_atol=0)


def test_powlu_mlp():
    mlp = GatedMLP(16, intermediate_size=24, hidden_act='powlu', powglu_power=2.5).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    g = x @ mlp.gate_proj.weight.T
    act = torch.where(g > 0, g.abs() ** (2.5 / (g.abs().sqrt() + 1)), g) * torch.sigmoid(g)
    assert_close('powlu', (act * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T, mlp(x), 1e-12, err_atol=0)
    with pytest.raises(KeyError, match='powlu'):   # as in FLA: the GLA layer's output gate has no 'powlu'
        GLAModel(tiny(hidden_act='powlu'))


def test_mlp_width():
    assert GatedMLP(32).intermediate_size == 256
    assert GatedMLP(1024).intermediate_size == 2816   # int(1024*4*2/3) = 2730 -> 2816
    assert GatedMLP(2048, hidden_ratio=2).intermediate_size == 2816
    assert GatedMLP(64, intermediate_size=100).intermediate_size == 100


def test_init_weights_are_flas():
    torch.manual_seed(0)
    m = GLAForCausalLM(tiny(hidden_size=128, num_heads=2, use_short_conv=True, conv_bias=True, pad_token_id=0,
                            vocab_size=512, initializer_range=0.05, intermediate_size=None))
    sd = m.state_dict()
    for key in ('model.layers.0.attn.q_proj.weight', 'model.layers.1.attn.v_conv1d.weight', 'model.layers.0.mlp.down_proj.weight',
                'model.embeddings.weight', 'lm_head.weight', 'model.layers.1.attn.gk_proj.0.weight'):
        assert abs(sd[key].std().item() - 0.05) < 0.006, key
        assert abs(sd[key].mean().item()) < 0.01, key
    for key in ('model.layers.0.attn.gk_proj.1.bias', 'model.layers.1.attn.q_conv1d.bias'):
        assert torch.equal(sd[key], torch.zeros_like(sd[key])), key
    for key in ('model.norm.weight', 'model.layers.0.attn_norm.weight', 'model.layers.1.attn.g_norm_swish_gate.weight'):
        assert torch.equal(sd[key], torch.ones_like(sd[key])), key
    assert sd['model.embeddings.weight'][0].abs().sum() > 0   # FLA does not zero the padding row


def test_prenorm_residual_strategies():
    m = GLAForCausalLM(tiny(num_hidden_layers=3, hidden_size=256))
    m._init_weights(m.model.layers[0].attn, prenorm_residual_strategy='zero')
    m._init_weights(m.model.layers[0].mlp, prenorm_residual_strategy='zero')
    assert m.model.layers[0].attn.o_proj.weight.abs().sum() == 0 and m.model.layers[0].mlp.down_proj.weight.abs().sum() == 0
    m._init_weights(m.model.layers[1].attn, prenorm_residual_strategy='rescale')
    w = m.model.layers[1].attn.o_proj.weight  # kaiming-uniform(a=sqrt 5): std = 1/sqrt(3 fan_in), then / sqrt(2 L)
    assert abs(w.std().item() - 1 / math.sqrt(3 * w.shape[1]) / math.sqrt(6)) < 2e-3
    with pytest.raises(ValueError, match='prenorm_residual_strategy'):
        m._init_weights(m.model.layers[2].attn, prenorm_residual_strategy='half')


def test_tied_word_embeddings(tmp_path):
    m = model_of(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embeddings.weight
    m.save_pretrained(tmp_path)
    again = GLAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert again.lm_head.weight is again.model.embeddings.weight
    assert torch.equal(again.lm_head.weight, m.lm_head.weight)


# ---------------------------------------------------------------------------------------------------------------
# forward, loss, outputs


def test_loss_shifts_labels_and_ignores_minus_100():
    m = model_of()
    ids = torch.randint(0, 64, (3, 10))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = m(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 64)
    target = labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(logits, target, ignore_index=-100)
    assert_close('loss', ref, out.loss, 1e-12, err_atol=0)
    assert out.loss.dtype == torch.float64
    m.criterion = nn.CrossEntropyLoss(reduction='sum')
    assert_close('custom criterion', F.cross_entropy(logits, target, reduction='sum'), m(ids, labels=labels).loss, 1e-12, err_atol=0)


def test_num_items_in_batch():
    m = model_of()
    ids = torch.randint(0, 64, (2, 8))
    labels = ids.clone()
    labels[1, :5] = -100
    logits = m(ids).logits
    total = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction='sum')
    assert_close('sum / n', total / 40, m(ids, labels=labels, num_items_in_batch=40).loss, 1e-12, err_atol=0)
    assert_close('tensor n', total / 40, m(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss, 1e-12, err_atol=0)
    m.criterion = nn.CrossEntropyLoss()   # a custom criterion is switched to a sum for this call only
    assert_close('custom criterion', total / 40, m(ids, labels=labels, num_items_in_batch=40).loss, 1e-12, err_atol=0)
    assert m.criterion.reduction == 'mean'
    class NoReduction(nn.Module):
        ignore_index = -100
        def forward(self, x, y):
            return x.sum()
    m.criterion = NoReduction()
    with pytest.raises(ValueError, match='reduction'):
        m(ids, labels=labels, num_items_in_batch=4)


def test_loss_in_float32_for_half_models():
    m = model_of(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    out = m(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    ref = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert_close('bf16 loss', ref, out.loss, 1e-6, err_atol=0)


def test_l2_warp_keeps_the_loss_and_adds_flas_gradient():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(logits.reshape(-1, 7), torch.randint(0, 7, (10,)))
    warped = l2_warp(loss, logits)
    assert warped.item() == loss.item()
    g_plain, = torch.autograd.grad(loss, logits, retain_graph=True)
    g_warp, = torch.autograd.grad(warped, logits)
    expected = torch.zeros_like(logits).scatter(-1, logits.argmax(-1, keepdim=True),
                                               logits.max(-1, keepdim=True).values * 1e-4 / 10)
    assert_close('l2warp grad', expected, g_warp - g_plain, 1e-12, err_atol=0)
    m = model_of(use_l2warp=True)
    ids = torch.randint(0, 64, (2, 6))
    assert_close('l2warp model loss', model_of()(ids, labels=ids).loss, m(ids, labels=ids).loss, 1e-14, err_atol=0)


def test_logits_to_keep_and_outputs():
    m = model_of()
    ids = torch.randint(0, 64, (2, 11))
    out = m(ids, output_hidden_states=True)
    assert_close('logits_to_keep', out.logits[:, -4:], m(ids, logits_to_keep=4).logits, 1e-14, err_atol=0)
    assert m(ids, num_logits_to_keep=1).logits.shape == (2, 1, 64)
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[0], m.model.embeddings(ids))
    assert_close('last hidden', m.lm_head(out.hidden_states[-1]), out.logits, 1e-14, err_atol=0)
    tup = m(ids, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)
    tup = m(ids, labels=ids, return_dict=False, use_cache=True)
    assert tup[0].dim() == 0 and isinstance(tup[2], Cache)
    emb = m.model.embeddings(ids)
    assert_close('inputs_embeds', out.logits, m(inputs_embeds=emb).logits, 1e-14, err_atol=0)
    with pytest.raises(ValueError, match='exactly one'):
        m(ids, inputs_embeds=emb)
    with pytest.raises(ValueError, match='exactly one'):
        m()
    with pytest.raises(ValueError, match='input_ids'):
        m(ids[0])
    with_labels = m(ids, labels=ids, logits_to_keep=2)   # FLA 0.6.0: labels need every position, logits_to_keep is ignored
    assert with_labels.logits.shape == (2, 11, 64) and torch.equal(with_labels.loss, m(ids, labels=ids).loss)
    picked = m(ids, logits_to_keep=torch.tensor([0, 5]))
    assert_close('logits_to_keep positions', out.logits[:, [0, 5]], picked.logits, 1e-14, err_atol=0)
    with pytest.warns(UserWarning, match='output_attentions'):
        m(ids, output_attentions=True)


def test_use_cache_defaults():
    m = model_of()
    ids = torch.randint(0, 64, (1, 5))
    assert isinstance(m(ids, return_dict=False)[1], Cache)    # eval: config.use_cache
    m.train()
    assert m(ids, return_dict=False)[1:] == ()      # training: no cache unless asked for
    m.config.use_cache = False
    m.eval()
    assert m(ids, return_dict=False)[1:] == ()


def test_cp_context_ignores_the_configs_use_cache(tmp_path):
    "In eval mode with `cp_context` the config's use_cache=True is not a request for a cache; an explicit one raises."
    import datetime
    import torch.distributed as dist
    from myfla_gla.ops.cp import build_cp_context
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        m = model_of(use_short_conv=True)
        assert m.config.use_cache and not m.training
        cu, ids = torch.tensor([0, 5, 12]), torch.randint(0, 64, (1, 12))
        ctx = build_cp_context(cu, None, conv1d_kernel_size=m.config.conv_size)
        out = m(ids, cp_context=ctx, return_dict=False)
        assert len(out) == 1                                              # logits, no cache
        assert_close('cp_context in eval', m(ids, cu_seqlens=cu, use_cache=False).logits, out[0], 1e-12, err_atol=0)
        for kw in (dict(use_cache=True), dict(past_key_values=Cache())):
            with pytest.raises(ValueError, match='not supported with `cp_context`'):
                m(ids, cp_context=ctx, **kw)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# keywords


def test_unknown_keywords_are_warned_about_once_by_name(monkeypatch):
    monkeypatch.setattr(checks, '_WARNED', set())
    m = model_of()
    ids = torch.randint(0, 64, (2, 6))
    for model, name, hint in ((m, 'cu_seqlen', '; did you mean `cu_seqlens`?'),
                              (m.model, 'atention_mask', '; did you mean `attention_mask`?'),
                              (m, 'shift_labels', '; did you mean `labels`?'), (m.model, 'seq_idx', '')):
        ref = model(ids)[0]
        owner = type(model).__name__
        with pytest.warns(UserWarning) as caught:
            out = model(ids, **{name: torch.ones(2, 6)})[0]
        assert [str(w.message) for w in caught] == [f"{owner}.forward() ignores the keyword argument `{name}`{hint}"]
        assert torch.equal(out, ref)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            model(ids, **{name: None})                                    # once per name


def test_packed_position_ids_without_cu_seqlens_are_warned_about(monkeypatch):
    "transformers' DataCollatorWithFlattening marks packed sequences by position_ids alone, which GLA cannot read."
    monkeypatch.setattr(models_gla, '_warned_kwargs', set())
    m = model_of()
    ids, packed = torch.randint(0, 64, (1, 7)), torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.warns(UserWarning, match='`position_ids` restart inside a row.*`cu_seqlens`'):
        m(ids, position_ids=packed)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m(ids, position_ids=packed)                                       # looked at once
        m.model(ids, position_ids=packed, cu_seqlens=torch.tensor([0, 3, 7]))
        m.model(ids, position_ids=packed, attention_mask=torch.ones_like(ids))   # e.g. left padding's positions
        m.model(ids, position_ids=torch.arange(7)[None])


@needs_transformers
def test_keywords_that_transformers_passes_are_silent(monkeypatch):
    "generate (greedy, sampled, beams, embeddings, no cache) and a Trainer's call (its batch, `num_items_in_batch`)."
    monkeypatch.setattr(models_gla, '_warned_kwargs', set())
    m = model_of(pad_token_id=0)
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        kw = dict(attention_mask=mask, max_new_tokens=2)
        m.generate(ids, do_sample=False, **kw)
        m.generate(ids, do_sample=True, top_k=5, return_dict_in_generate=True, output_scores=True, output_logits=True,
                   output_hidden_states=True, **kw)
        m.generate(ids, num_beams=2, **kw)
        m.generate(ids, use_cache=False, **kw)
        m.generate(inputs_embeds=m.model.embeddings(ids), **kw)
        positions = torch.arange(6).expand(2, 6)
        batch = dict(input_ids=ids, attention_mask=mask, labels=ids, position_ids=positions, token_type_ids=0 * ids)
        m.train()
        m(**batch, num_items_in_batch=torch.tensor(10), return_dict=True).loss.backward()
        m.model(ids, position_ids=positions, cache_position=torch.arange(6), num_items_in_batch=10)
    assert not [str(w.message) for w in caught if 'ignores the keyword argument' in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------
# caches


@pytest.mark.parametrize('name', CONFIGS)
def test_cache_continuation_equals_one_pass(name):
    "Prefill (chunk path, > 64 tokens), a multi-token continuation, then single tokens: the logits of one pass."
    m = model_of(**CONFIGS[name])
    ids = torch.randint(0, 64, (2, 80))
    full = m(ids, use_cache=False).logits
    cache = Cache()
    parts = [m(ids[:, :66], past_key_values=cache, use_cache=True).logits,
             m(ids[:, 66:75], past_key_values=cache, use_cache=True).logits]
    parts += [m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(75, 80)]
    assert_close(f'{name} continuation', full, torch.cat(parts, 1), 1e-10, err_atol=0)
    assert len(cache) == m.config.num_hidden_layers and cache.get_seq_length() == 80
    H = m.config.num_heads
    K, V = int(32 * m.config.expand_k) // H, int(32 * m.config.expand_v) // H
    for i in range(len(cache)):
        state = cache[i]['recurrent_state']
        assert state.shape == (2, H, V, K) and state.dtype in (torch.float32, torch.float64)
        assert (cache[i]['conv_state'] is not None) == m.config.use_short_conv
    assert not torch.equal(cache[0]['recurrent_state'], cache[1]['recurrent_state'])


def test_legacy_cache_and_the_cache_keyword():
    m = model_of(use_short_conv=True)
    ids = torch.randint(0, 64, (2, 12))
    full = m(ids).logits
    cache = Cache()
    a = m(ids[:, :7], past_key_values=cache, use_cache=True).logits
    legacy = cache.to_legacy_cache()
    assert isinstance(legacy, tuple) and len(legacy) == 2
    b = m(ids[:, 7:], past_key_values=legacy, use_cache=True).logits
    assert_close('legacy continuation', full, torch.cat([a, b], 1), 1e-10, err_atol=0)
    cache = Cache()
    a = m(ids[:, :7], cache=cache, use_cache=True).logits           # transformers' newer keyword
    b = m(ids[:, 7:], cache=cache, use_cache=True).logits
    assert_close('cache keyword', full, torch.cat([a, b], 1), 1e-10, err_atol=0)
    with pytest.raises(ValueError, match='once'):
        m(ids, past_key_values=Cache(), cache=Cache())


@pytest.mark.parametrize('name', ['default', 'short_conv', 'gqa_conv_bias', 'attnres'])
def test_left_padded_generation_equals_each_row_alone(name):
    "FLA's test_generation at a CPU size: left-padded prefill (chunk path), then single-token steps with the mask."
    m = model_of(**CONFIGS[name])
    B, T, n_new = 4, 70, 10
    starts = torch.tensor([1, 9, 30, 69])
    ids = torch.randint(0, 64, (B, T + n_new))
    mask = (torch.arange(T + n_new)[None] >= starts[:, None]).long()
    cache = Cache()
    logits = [m(ids[:, :T], attention_mask=mask[:, :T], past_key_values=cache, use_cache=True).logits]
    for t in range(T, T + n_new):
        logits.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True).logits)
    logits = torch.cat(logits, 1)
    for b in range(B):
        alone = m(ids[b:b + 1, starts[b]:], use_cache=False).logits[0]
        assert_close(f'{name} row {b}', alone, logits[b, starts[b]:], 1e-10, err_atol=0)


def test_left_padded_generation_float32():
    m = model_of(torch.float32, use_short_conv=True)
    ids = torch.randint(0, 64, (3, 76))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :40] = 0
    cache = Cache()
    logits = [m(ids[:, :68], attention_mask=mask[:, :68], past_key_values=cache, use_cache=True).logits]
    logits += [m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True).logits
               for t in range(68, 76)]
    logits = torch.cat(logits, 1)
    for b, s in enumerate([5, 0, 40]):
        assert_close(f'row {b}', m(ids[b:b + 1, s:]).logits[0], logits[b, s:], 1e-4, err_atol=0)


@pytest.mark.parametrize('name', ['default', 'short_conv', 'gqa_conv_bias', 'attnres'])
def test_packed_input_equals_the_batch(name):
    "FLA's test_modeling at a CPU size: `[B, T]` vs the same tokens as `[1, B*T]` with cu_seqlens; then backward."
    m = model_of(**CONFIGS[name])
    B, T = 3, 70
    ids = torch.randint(0, 64, (B, T))
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    results = []
    for x, kw in ((ids, {}), (ids.reshape(1, -1), {'cu_seqlens': cu})):
        m.zero_grad()
        out = m(x, labels=x if not kw else None, **kw)
        h = m.model(x, **kw).last_hidden_state.reshape(B, T, -1)
        (h.square().mean() + out.logits.square().mean()).backward()
        results.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert_close(f'{name} packed hidden', results[0][0], results[1][0], 1e-10, err_atol=0)
    assert results[0][1].keys() == results[1][1].keys()   # (block 0's attention-residual query is never used)
    for n, g in results[0][1].items():
        assert_close(f'{name} grad {n}', g, results[1][1][n], 1e-10, err_atol=0)


def test_packed_unequal_lengths_equal_each_sequence_alone():
    m = model_of(use_short_conv=True)
    lens = [5, 70, 1, 20]
    ids = torch.randint(0, 64, (1, sum(lens)))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    packed = m(ids, cu_seqlens=cu).logits[0]
    for i in range(len(lens)):
        alone = m(ids[:, cu[i]:cu[i + 1]]).logits[0]
        assert_close(f'sequence {i}', alone, packed[cu[i]:cu[i + 1]], 1e-10, err_atol=0)


# ---------------------------------------------------------------------------------------------------------------
# generation


def test_simple_generate_greedy_equals_the_manual_loop_and_stops_at_eos():
    m = model_of(use_short_conv=True)
    prompt = torch.randint(0, 64, (2, 6))
    out = simple_generate(m, prompt, max_new_tokens=7)
    ids = prompt
    for _ in range(7):
        ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    assert torch.equal(simple_generate(m, prompt, max_new_tokens=7, use_cache=False), ids)
    assert simple_generate(m, prompt, max_length=10).shape == (2, 10)
    eos = int(ids[0, 8])   # row 0 emits this token at its third step
    stopped = simple_generate(m, prompt, max_new_tokens=7, eos_token_id=eos, pad_token_id=63)
    assert torch.equal(stopped[0, :9], ids[0, :9]) and (stopped[0, 9:] == 63).all()


def test_simple_generate_sampling():
    m = model_of()
    prompt = torch.randint(0, 64, (3, 4))
    g = torch.Generator().manual_seed(1)
    a = simple_generate(m, prompt, max_new_tokens=5, do_sample=True, top_k=5, generator=g)
    g.manual_seed(1)
    b = simple_generate(m, prompt, max_new_tokens=5, do_sample=True, top_k=5, generator=g)
    assert torch.equal(a, b)
    top1 = simple_generate(m, prompt, max_new_tokens=5, do_sample=True, top_k=1)
    assert torch.equal(top1, simple_generate(m, prompt, max_new_tokens=5))
    nucleus = simple_generate(m, prompt, max_new_tokens=5, do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus, simple_generate(m, prompt, max_new_tokens=5))
    logits = torch.tensor([[3., 2., 1., 0.]])
    kept = models_gla._top_k_top_p(logits, None, 0.8).isfinite()   # p = .64 .24 .09 .03 -> first two
    assert kept.tolist() == [[True, True, False, False]]


@needs_transformers
def test_transformers_generate_equals_simple_generate_with_left_padding():
    m = model_of(use_short_conv=True)
    prompt = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ours = simple_generate(m, prompt, attention_mask=mask, max_new_tokens=6)
    theirs = m.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)
    for b, s in enumerate([4, 0, 1]):   # each row alone generates the same continuation
        assert torch.equal(simple_generate(m, prompt[b:b + 1, s:], max_new_tokens=6)[0, -6:], ours[b, -6:])
    emb = m.get_input_embeddings()(prompt)   # prompt given as embeddings: only the new tokens come back
    assert torch.equal(m.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False), ours[:, 9:])


@needs_transformers
def test_transformers_beam_search_and_sampling_use_the_cache_correctly():
    m = model_of(use_short_conv=True)
    prompt = torch.randint(0, 64, (2, 6))
    beams = m.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)   # reorders the cache between steps
    assert torch.equal(beams, m.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False))
    torch.manual_seed(3)
    sampled = m.generate(prompt, max_new_tokens=5, do_sample=True, top_k=4)
    torch.manual_seed(3)
    assert torch.equal(sampled, m.generate(prompt, max_new_tokens=5, do_sample=True, top_k=4, use_cache=False))


@needs_transformers
def test_transformers_save_load_and_gradient_checkpointing(tmp_path):
    from transformers import PreTrainedModel, PretrainedConfig
    m = model_of(use_short_conv=True)
    assert isinstance(m, PreTrainedModel) and isinstance(m.config, PretrainedConfig)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'gla'
    again = GLAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, m(ids).logits)
    base = GLAModel.from_pretrained(tmp_path, dtype=torch.float64)   # the base model from a causal-LM checkpoint
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, m.model(ids).last_hidden_state)
    m.train()
    grads = []
    for ckpt in (False, True):
        if ckpt:
            (getattr(m, 'activation_checkpointing_enable', None) or m.gradient_checkpointing_enable)()  # renamed in recent transformers
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close('checkpointed grad', a, b, 1e-12, err_atol=0)


def test_plain_save_pretrained_is_readable(tmp_path):
    "The plain path's writer, used on any model: config.json plus safetensors; loads back through from_pretrained."
    m = model_of(use_short_conv=True)
    models_gla._PlainPreTrainedModel.save_pretrained(m, tmp_path)
    assert (tmp_path / 'model.safetensors').is_file()
    sd = models_gla.load_state_dict_from_folder(tmp_path)
    assert sd.keys() == m.state_dict().keys()
    again = GLAForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in m.state_dict().items())
    with pytest.raises(OSError, match='No weights'):
        models_gla.load_state_dict_from_folder(tmp_path / 'nowhere')


def write_fla_style_checkpoint(folder: Path, model: GLAForCausalLM, shards: int = 2):
    "A checkpoint folder as FLA 0.6.0 + transformers 5 write it: FLA's config keys, bf16 weights, sharded safetensors."
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {k: getattr(c, k) for k in (
        'hidden_size', 'expand_k', 'expand_v', 'hidden_ratio', 'intermediate_size', 'num_hidden_layers', 'num_heads',
        'num_kv_heads', 'feature_map', 'attn_mode', 'use_short_conv', 'conv_size', 'use_output_gate', 'clamp_min',
        'hidden_act', 'max_position_embeddings', 'elementwise_affine', 'norm_eps', 'use_gk', 'use_gv', 'attn',
        'use_cache', 'pad_token_id', 'bos_token_id', 'eos_token_id', 'tie_word_embeddings', 'initializer_range',
        'fuse_norm', 'fuse_swiglu', 'fuse_cross_entropy', 'fuse_linear_cross_entropy', 'use_l2warp', 'vocab_size',
        'attnres_block_size')}
    config.update(architectures=['GLAForCausalLM'], model_type='gla', dtype='bfloat16', transformers_version='5.17.0')
    (folder / 'config.json').write_text(json.dumps(config, indent=2))
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(folder / name), metadata={'format': 'pt'})
        weight_map.update({k: name for k in part})
    (folder / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
    return sd


def test_loads_an_fla_style_checkpoint_folder(tmp_path):
    m = model_of(torch.float32, use_short_conv=True, attnres_block_size=2)
    sd = write_fla_style_checkpoint(tmp_path / 'fla', m)
    loaders = {'from_pretrained': lambda path: GLAForCausalLM.from_pretrained(path, dtype='auto'),   # transformers' when installed
               'plain loader': lambda path: models_gla._PlainPreTrainedModel.from_pretrained.__func__(GLAForCausalLM, path, dtype='auto')}
    for name, load in loaders.items():
        loaded = load(tmp_path / 'fla')
        assert loaded.dtype == torch.bfloat16 and loaded.config.use_short_conv and loaded.config.attnres_block_size == 2
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
        ids = torch.randint(0, 64, (2, 10))
        ref = copy.deepcopy(m).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# without transformers


NO_TRANSFORMERS = r'''
import sys
sys.modules['transformers'] = None          # any `import transformers` now raises ImportError
import json, torch, torch.nn as nn
from pathlib import Path
torch.set_num_threads(1)
import myfla_gla
from myfla_gla import GLAConfig, GLAForCausalLM, GLAModel, Cache
from myfla_gla.models import gla
assert not gla.TRANSFORMERS_AVAILABLE
assert all('transformers' not in repr(c) for c in GLAForCausalLM.__mro__), GLAForCausalLM.__mro__
assert 'transformers' not in sys.modules or sys.modules['transformers'] is None
d = Path(sys.argv[1])
ref = torch.load(d / 'ref.pt')
model = GLAForCausalLM.from_pretrained(d / 'ckpt', dtype=torch.float64)   # written by transformers' save_pretrained
assert isinstance(model, nn.Module) and not model.training
with torch.no_grad():
    out = model(ref['ids'], labels=ref['ids'])
    assert torch.equal(out.logits, ref['logits']), (out.logits - ref['logits']).abs().max()
    assert torch.equal(out[1], ref['logits']) and torch.equal(out['loss'], out.loss)
    assert torch.equal(out.loss, ref['loss'])
gen = model.generate(ref['prompt'], attention_mask=ref['mask'], max_new_tokens=6)
assert torch.equal(gen, ref['generated']), (gen, ref['generated'])
assert torch.equal(model.generate(inputs=ref['prompt'], attention_mask=ref['mask'], max_new_tokens=6), gen)
cache = Cache()
a = model(ref['ids'][:, :5], past_key_values=cache, use_cache=True)
assert a.past_key_values is cache and len(cache) == model.config.num_hidden_layers
model.save_pretrained(d / 'plain')
cfg = json.loads((d / 'plain' / 'config.json').read_text())
assert cfg['model_type'] == 'gla' and cfg['use_short_conv'] is True
again = GLAForCausalLM.from_pretrained(d / 'plain', dtype='auto')
assert again.dtype == torch.float64 or again.dtype == torch.float32
assert all(torch.equal(again.state_dict()[k].double(), v) for k, v in model.state_dict().items())
base = GLAModel(GLAConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=10))
assert abs(base.embeddings.weight.std().item() - 0.02) < 0.01 and base.config.to_dict()['hidden_size'] == 32
(d / 'plain' / 'model.onnx').write_text('not ours')
model.save_pretrained(d / 'plain')                                  # in place: the other file stays
assert sorted(p.name for p in (d / 'plain').iterdir()) == ['config.json', 'model.onnx', 'model.safetensors']
from myfla_gla.models.checkpoint import CheckpointFileError
(d / 'plain' / 'config.json').write_text('[1]')                      # bad files are named on this path too
for read in (GLAConfig.from_pretrained, GLAForCausalLM.from_pretrained):
    try:
        read(d / 'plain')
        raise AssertionError('a JSON list was read as a config')
    except CheckpointFileError as e:
        assert "config.json' holds a list" in str(e), e
fla = GLAForCausalLM.from_pretrained(d / 'fla', dtype='auto')      # FLA-style: sharded bf16 safetensors
assert fla.dtype == torch.bfloat16 and fla.config.architectures == ['GLAForCausalLM']
with torch.no_grad():
    assert torch.equal(fla(ref['ids']).logits, ref['fla_logits'])
print('plain path ok')
'''


def test_without_transformers(tmp_path):
    "A subprocess in which transformers cannot be imported: plain nn.Module classes load a transformers-saved checkpoint."
    m = model_of(use_short_conv=True)
    ids = torch.randint(0, 64, (2, 12))
    prompt = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    with torch.no_grad():
        out = m(ids, labels=ids)
    gen = simple_generate(m, prompt, attention_mask=mask, max_new_tokens=6)
    m.save_pretrained(tmp_path / 'ckpt')
    write_fla_style_checkpoint(tmp_path / 'fla', m)
    with torch.no_grad():
        fla_logits = copy.deepcopy(m).to(torch.bfloat16)(ids).logits
    torch.save({'ids': ids, 'logits': out.logits, 'loss': out.loss, 'prompt': prompt, 'mask': mask, 'generated': gen,
                'fla_logits': fla_logits}, tmp_path / 'ref.pt')
    env = {**os.environ, 'PYTHONPATH': str(root) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    res = subprocess.run([sys.executable, '-c', NO_TRANSFORMERS, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'plain path ok' in res.stdout


def test_gated_mlp_warns_about_a_keyword_it_does_not_use(monkeypatch):
    "The block passes the layer's keywords on to its MLP; anything else is named once, not dropped silently."
    monkeypatch.setattr(checks, '_WARNED', set())
    mlp, x = GatedMLP(16), torch.randn(1, 8, 16)
    with pytest.warns(UserWarning, match=r'GatedMLP.forward\(\) ignores the keyword argument `bogus`'):
        y = mlp(x, bogus=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.testing.assert_close(mlp(x, cu_seqlens=None, cp_context=None), y)
