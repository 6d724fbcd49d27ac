"""FLA parity of the softmax `Attention` layer, `RotaryEmbedding` and hybrid GLA models on CUDA. flash-attn is not
needed: FLA's calls to it go to `flash_attn_ref` (flash-attn's definition in float64), while FLA's own rotary
(Triton), RMSNorm (Triton), cache, padding, window and packing code runs. Skipped without CUDA or without FLA."""
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flash_attn_ref  # noqa: E402

flash_attn_ref.install()                      # before FLA imports flash_attn (and on fla.layers.attn if imported)
fla_attn = pytest.importorskip('fla.layers.attn')
fla_rotary = pytest.importorskip('fla.modules.rotary')
flash_attn_ref.install()
fla_models = pytest.importorskip('fla.models')

from myfla_gla import Cache, GLAConfig, GLAForCausalLM, assert_close  # noqa: E402
from myfla_gla.layers.attn import Attention  # noqa: E402
from myfla_gla.modules.rotary import RotaryEmbedding  # noqa: E402

DEV = 'cuda'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('kw', [{}, {'interleaved': True}, {'scale_base': 64.}], ids=['half', 'interleaved', 'xpos'])
def test_rotary_matches_fla(kw, dtype):
    torch.manual_seed(0)
    theirs, ours = fla_rotary.RotaryEmbedding(32, **kw).to(DEV), RotaryEmbedding(32, **kw).to(DEV)
    q = torch.randn(2, 40, 4, 64, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 40, 2, 64, device=DEV, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 40, 4, 64, device=DEV, dtype=dtype)
    cu = torch.tensor([0, 7, 30, 80], device=DEV)
    cases = {'plain': dict(), 'offset': dict(seqlen_offset=5),
             'tensor offsets': dict(seqlen_offset=torch.tensor([3, -4], device=DEV), max_seqlen=64),
             'packed': dict(cu_seqlens=cu, max_seqlen=80, reshape=True)}   # FLA: a table of the packed length
    for name, args in cases.items():
        reshape = args.pop('reshape', False)
        qq, kk, gg = (x.reshape(1, 80, *x.shape[2:]) if reshape else x for x in (q, k, g))
        a, b = theirs(qq, kk, **args), ours(qq, kk, **args)
        for what, x, y in (('q', a[0], b[0]), ('k', a[1], b[1])):
            assert x.dtype == y.dtype
            assert_close(f'rotary {name} {what}', x.float(), y.float(), 1e-6 if dtype == torch.float32 else 5e-3, err_atol=0)
        da, db = (torch.autograd.grad((o[0].float() * gg.float()).sum() + o[1].float().sum(), (q, k)) for o in (a, b))
        for what, x, y in zip('qk', da, db):
            assert_close(f'rotary {name} d{what}', x.float(), y.float(), 1e-6 if dtype == torch.float32 else 5e-3, err_atol=0)


def pair(**kw):
    kw = {'hidden_size': 128, 'num_heads': 4, 'layer_idx': 0, **kw}
    torch.manual_seed(0)
    theirs = fla_attn.Attention(**kw).to(DEV)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    ours = Attention(**kw).to(DEV)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def run_all(layer, cache_cls, x, mask):
    "Every path of the layer's forward, outputs (and the caches' keys) in a dict."
    out = {'plain': layer(x)[0], 'packed': layer(x[:1], cu_seqlens=torch.tensor([0, 9, 24, 40], device=DEV))[0]}
    cache = cache_cls()
    out['steps'] = torch.cat([layer(x[:, :30], past_key_values=cache)[0]] +
                             [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in range(30, 40)], 1)
    out['steps_k'] = cache[0]['attn_state'][0]
    cache = cache_cls()
    out['chunks'] = torch.cat([layer(x[:, :25], past_key_values=cache)[0], layer(x[:, 25:], past_key_values=cache)[0]], 1)
    cache = cache_cls()
    out['padded'] = torch.cat([layer(x[:, :35], attention_mask=mask[:, :35], past_key_values=cache)[0]] +
                              [layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)[0]
                               for t in range(35, 40)], 1)
    out['padded_k'] = cache[0]['attn_state'][0]
    return out


@pytest.mark.parametrize('kw', [{}, {'num_kv_heads': 2, 'window_size': 8}, {'num_kv_heads': 1, 'qkv_bias': True,
                                'qk_norm': True}, {'window_size': 1, 'rope_theta': 500., 'max_position_embeddings': 64}],
                         ids=['mha', 'gqa_window', 'mqa_bias_qknorm', 'window1'])
def test_layer_matches_fla(kw):
    theirs, ours = pair(**kw)
    torch.manual_seed(1)
    x = torch.randn(2, 40, 128, device=DEV, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.long, device=DEV)
    mask[0, :6] = 0
    from fla.models.utils import Cache as FLACache
    a, b = run_all(theirs, FLACache, x, mask), run_all(ours, Cache, x, mask)
    for name in a:
        assert_close(f'attention {name}', a[name].float(), b[name].float(), 1e-5, err_atol=0)
    g = torch.randn_like(a['plain'])
    params = [x, *theirs.parameters()]
    da = torch.autograd.grad((a['plain'] * g).sum(), params)
    db = torch.autograd.grad((b['plain'] * g).sum(), [x, *ours.parameters()])
    for (n, _), x1, x2 in zip([('x', None), *theirs.named_parameters()], da, db):
        if kw.get('window_size') == 1 and n.startswith(('q_', 'k_')):
            # a window of one: each query sees only its own key, its weight is exactly 1, and q, k get no gradient;
            # both sides give rounding noise
            assert x1.abs().max() < 1e-4 and x2.abs().max() < 1e-4, n
            continue
        assert_close(f'attention d{n}', x1, x2, 1e-5, err_atol=0)


def test_hybrid_model_matches_fla():
    kw = dict(hidden_size=256, num_hidden_layers=3, num_heads=4, vocab_size=1000, bos_token_id=None, eos_token_id=None,
              use_short_conv=True, attn={'layers': [1], 'num_heads': 4, 'num_kv_heads': 2, 'window_size': 16})
    torch.manual_seed(0)
    theirs = fla_models.GLAForCausalLM(fla_models.GLAConfig(**kw)).to(DEV).eval()
    ours = GLAForCausalLM(GLAConfig(**kw)).to(DEV).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.randint(0, 1000, (2, 100), device=DEV)
    with torch.no_grad():
        a, b = theirs(ids, labels=ids), ours(ids, labels=ids)
    # FLA's GLA kernels use tf32 matmuls (test_models_fla.py's bound)
    assert_close('hybrid logits', a.logits.float(), b.logits.float(), 5e-3, err_atol=0)
    assert_close('hybrid loss', a.loss.float(), b.loss.float(), 5e-3, err_atol=0)
    # our cached greedy decoding, teacher-forced through FLA's model: FLA picks the same tokens, but for near ties
    gen = ours.generate(ids[:, :20], max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        logits = theirs(gen).logits[:, 19:-1].float()                  # FLA's logits for each generated token
    chosen = logits.gather(-1, gen[:, 20:, None])[..., 0]
    gap = logits.max(-1).values - chosen                              # 0 where FLA's argmax is our token
    assert (gap <= 1e-3 * logits.abs().max()).all(), f'FLA prefers other tokens by {gap.max():.2e}'
