"""FLA's softmax `Attention`, its `RotaryEmbedding` and hybrid GLA models against float64 references of FLA's
semantics: RoPE written as complex rotations, attention written out (`flash_attn_ref`, flash-attn's definition),
FLA's positions (after the cache; after the padding with a cache and a mask), GQA, causal and sliding-window masks,
packing, the cache; gradients by autograd through both. A checkpoint written by FLA's own hybrid model loads strict
and FLA's `Attention` layer (run on the CPU with `flash_attn_ref` for flash-attn) gives the same outputs and cache.
Context parallelism of the layer and of hybrid models is checked with the other CP cases in test_cp.py."""

import pytest
import torch

from helpers import run_with_fla
from flash_attn_ref import flash_attn_func
from myfla_gla import Cache, GLAConfig, GLAForCausalLM
from myfla_gla.checks import DTypeError, InputError
from myfla_gla.layers.attn import Attention
from myfla_gla.modules.rotary import RotaryEmbedding, rotary_embedding, rotary_embedding_ref

pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)
F64 = torch.float64


# ---------------------------------------------------------------- references

def rope_ref(x, pos, base=10000., rot_dim=None, interleaved=False, xpos=None):
    "x [B, T, H, D] rotated at positions pos [B, T] (float64, complex numbers); xpos = (scale_base, table length, sign)."
    D = x.shape[-1]
    R = (rot_dim or D) // 2
    freq = base ** (-torch.arange(0, 2 * R, 2, dtype=F64) / (2 * R))
    ang = pos.to(F64)[..., None] * freq                                         # [B, T, R]
    xr = x[..., :2 * R].to(F64)
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :R], xr[..., R:])
    z = torch.complex(a, b) * torch.polar(torch.ones_like(ang), ang)[:, :, None]
    if xpos is not None:
        scale_base, length, sign = xpos
        zeta = (torch.arange(0, 2 * R, 2, dtype=F64) + 0.4 * 2 * R) / (1.4 * 2 * R)
        z = z * (zeta ** (sign * (pos.to(F64) - length // 2)[..., None] / scale_base))[:, :, None]
    y = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    y = torch.where((pos >= 0)[..., None, None], y, 0)
    return torch.cat([y, x[..., 2 * R:].to(F64)], -1)


def layer_ref(layer, x, pos, window=None):
    "One sequence per row, every token real: FLA's layer in float64 at rotary positions pos [B, T] (causal from 0)."
    d = layer.head_dim
    q, k, v = (p(x.to(F64)).unflatten(-1, (-1, d)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if layer.qk_norm:
        q, k = (torch.nn.functional.rms_norm(t, (d,), n.weight.to(F64), n.eps) for t, n in ((q, layer.q_norm), (k, layer.k_norm)))
    q, k = rope_ref(q, pos, layer.rope_theta), rope_ref(k, pos, layer.rope_theta)
    o = flash_attn_func(q, k, v, causal=True, window_size=(-1, -1) if window is None else (window - 1, 0))
    return layer.o_proj(o.flatten(-2).to(layer.o_proj.weight.dtype))


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {'hidden_size': 32, 'num_heads': 4, 'layer_idx': 0, **kw}
    layer = Attention(**kw).to(F64)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    return layer


def close(a, b, tol=1e-10):
    err = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()   # (an exactly zero gradient: absolute)
    assert err <= tol, f'relative error {err:.2e} > {tol:.0e}'


# ---------------------------------------------------------------- rotary

@pytest.mark.parametrize('interleaved', [False, True])
@pytest.mark.parametrize('rot_dim', [8, 4])   # the whole head, or its first half
def test_rotary_matches_complex_rotation(interleaved, rot_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=F64, requires_grad=True)
    rope = RotaryEmbedding(rot_dim, base=500., interleaved=interleaved)
    for offset, pos in ((0, torch.arange(5)[None].expand(2, 5)), (7, torch.arange(7, 12)[None].expand(2, 5)),
                        (torch.tensor([3, -2]), torch.arange(5) + torch.tensor([[3], [-2]]))):
        y, yk = rope(x, x[:, :, :1], seqlen_offset=offset, max_seqlen=16)
        want = rope_ref(x, pos, 500., rot_dim, interleaved)
        close(y, want, 1e-6)   # FLA's tables are computed in float32
        close(yk, want[:, :, :1], 1e-6)
        g = torch.randn_like(x)
        close(torch.autograd.grad((y * g).sum(), x)[0], torch.autograd.grad((want * g).sum(), x)[0], 1e-6)


def test_rotary_packed_sequences_restart_with_their_offsets():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 2, 8, dtype=F64)
    cu = torch.tensor([0, 4, 4, 9])
    rope = RotaryEmbedding(8)
    y, _ = rope(x, x, seqlen_offset=torch.tensor([2, 0, 5]), cu_seqlens=cu, max_seqlen=16)
    pos = torch.tensor([[2, 3, 4, 5, 5, 6, 7, 8, 9]])
    close(y, rope_ref(x, pos), 1e-6)
    y0, _ = rope(x, x, cu_seqlens=cu)   # int offset 0: each sequence from 0
    close(y0, rope_ref(x, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])), 1e-6)


def test_rotary_xpos_tables_and_dtype():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 2, 8, dtype=F64), torch.randn(1, 6, 2, 8, dtype=F64)
    rope = RotaryEmbedding(8, scale_base=16.)
    qr, kr = rope(q, k, max_seqlen=10)
    pos = torch.arange(6)[None]
    close(qr, rope_ref(q, pos, xpos=(16., 10, 1)), 1e-6)
    close(kr, rope_ref(k, pos, xpos=(16., 10, -1)), 1e-6)
    assert 'scale_base=16.0' in repr(rope) and len(rope.state_dict()) == 0   # tables and frequencies are not saved
    # tables in the queries' dtype (bf16 here), the rotation in float32: FLA's kernel
    rope = RotaryEmbedding(8)
    qb = q.to(torch.bfloat16)
    yb, _ = rope(qb, qb)
    assert yb.dtype == torch.bfloat16 and rope._cos_cached.dtype == torch.bfloat16
    close(yb.to(F64), rope_ref(qb.to(F64), pos), 1e-2)


@pytest.mark.parametrize('interleaved', [False, True])
def test_rotary_embedding_ref_takes_aligned_rows(interleaved):
    # FLA's own rotary tests import `rotary_embedding_ref` from `fla.modules.rotary` and call it on one sequence
    # without a batch ([T, H, D]) with the table rows of its positions, also for a partial rotary dimension
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=F64)
    rope = RotaryEmbedding(4, base=500., interleaved=interleaved)
    rope(x, x, max_seqlen=16)   # fills the tables (float32)
    cos, sin = (t.to(F64) for t in (rope._cos_cached, rope._sin_cached))
    y = rotary_embedding_ref(x[1], cos[3:8], sin[3:8], interleaved)
    close(y, rope_ref(x[1:2], torch.arange(3, 8)[None], 500., 4, interleaved)[0], 1e-6)
    assert torch.equal(y[..., 4:], x[1, ..., 4:])   # the channels past the rotary dimension pass through
    with pytest.raises(InputError, match='rotary dimension'):
        rotary_embedding_ref(x[..., :2], cos, sin)


def test_rotary_and_layer_stay_on_the_inputs_device():
    """Every tensor the rotary embedding and the layer make is on the inputs' device: on 'meta' (a device of its own
    on any machine) a tensor made on the CPU raises, as it did on CUDA."""
    x, cos, sin = torch.randn(2, 10, 4, 16, device='meta'), torch.randn(32, 4, device='meta'), torch.randn(32, 4, device='meta')
    offsets, cu = torch.tensor([1, 2], device='meta'), torch.tensor([0, 3, 10], device='meta')
    assert rotary_embedding(x, cos, sin).device.type == 'meta'
    assert rotary_embedding(x, cos, sin, seqlen_offsets=offsets).device.type == 'meta'
    assert rotary_embedding(x[:1], cos, sin, cu_seqlens=cu).device.type == 'meta'
    with torch.device('meta'):
        layer, h = Attention(hidden_size=64, num_heads=4, window_size=4), torch.randn(2, 10, 64)
        assert layer(h)[0].device.type == 'meta'
        assert layer(h[:1], cu_seqlens=cu)[0].device.type == 'meta'


def test_rotary_bad_inputs():
    cos = torch.ones(4, 4)
    with pytest.raises(InputError, match='`dim`'):
        RotaryEmbedding(7)
    with pytest.raises(InputError, match='exceeds'):
        rotary_embedding(torch.randn(1, 5, 1, 8), cos, cos)               # 5 tokens, 4 positions
    with pytest.raises(DTypeError, match='one dtype'):
        rotary_embedding(torch.randn(1, 2, 1, 8, dtype=F64), cos, cos)
    with pytest.raises(InputError, match='rotary dimension'):
        rotary_embedding(torch.randn(1, 2, 1, 6), cos, cos)
    with pytest.raises(InputError, match='seqlen_offsets'):
        rotary_embedding(torch.randn(2, 2, 1, 8), cos, cos, seqlen_offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match='max_seqlen'):
        RotaryEmbedding(8)(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), seqlen_offset=torch.tensor([0, 1]))


# ---------------------------------------------------------------- the layer

@pytest.mark.parametrize('kw', [{}, {'num_kv_heads': 2, 'window_size': 3}, {'num_kv_heads': 1, 'qkv_bias': True},
                                {'qk_norm': True, 'window_size': 1, 'rope_theta': 100.}])
def test_layer_matches_reference_with_gradients(kw):
    layer = make_layer(**kw)
    x = torch.randn(2, 7, 32, dtype=F64, requires_grad=True)
    o, attentions, cache = layer(x)
    want = layer_ref(layer, x, torch.arange(7)[None].expand(2, 7), kw.get('window_size'))
    close(o, want, 1e-6)   # FLA's rotary tables are float32
    assert attentions is None and cache is None
    g = torch.randn_like(o)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad((o * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        close(a, b, 1e-6)


@pytest.mark.parametrize('window', [None, 2, 4])
@pytest.mark.parametrize('chunks', [[1] * 7, [3, 1, 3], [2, 5]])
def test_cache_decoding_equals_one_pass(window, chunks):
    "Token by token or in chunks (flash-attn's bottom-right alignment), the cache gives the one-pass outputs."
    layer = make_layer(num_kv_heads=2, window_size=window)
    x = torch.randn(2, 7, 32, dtype=F64)
    full = layer(x)[0]
    cache, outs, t = Cache(), [], 0
    for n in chunks:
        outs.append(layer(x[:, t:t + n], past_key_values=cache, use_cache=True)[0])
        t += n
    close(torch.cat(outs, 1), full)
    k = cache[0]['attn_state'][0]
    assert k.shape == (2, 7 if window is None else min(window, 7), 16) and cache.get_seq_length(0) == 7


def test_left_padding_with_cache_equals_each_prompt_alone():
    "Positions start after the padding (FLA's offsets from the mask), padding gives 0; decoding goes on alike."
    layer = make_layer(num_kv_heads=2, window_size=3)
    x = torch.randn(2, 6, 32, dtype=F64)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache = Cache()
    o = layer(x, attention_mask=mask, past_key_values=cache)[0]
    assert torch.all(o[0, :3] == 0)
    alone = [layer(x[:1, 3:], past_key_values=Cache())[0], layer(x[1:], past_key_values=Cache())[0]]
    close(o[0, 3:], alone[0][0])
    close(o[1], alone[1][0])
    step = torch.randn(2, 1, 32, dtype=F64)
    o2 = layer(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), past_key_values=cache)[0]
    for b, start in ((0, 3), (1, 0)):
        seq = torch.cat([x[b:b + 1, start:], step[b:b + 1]], 1)
        close(o2[b], layer_ref(layer, seq, torch.arange(seq.shape[1])[None], 3)[0, -1:], 1e-6)


def test_padding_without_cache_keeps_fla_positions():
    "Without a cache FLA does not shift positions by the padding: rotary positions are the column indices."
    layer = make_layer()
    x = torch.randn(1, 5, 32, dtype=F64)
    o = layer(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))[0]
    q_pos = torch.arange(2, 5)[None]
    close(o[:, 2:], layer_ref(layer, x[:, 2:], q_pos), 1e-6)
    assert torch.all(o[:, :2] == 0)


def test_packed_sequences_do_not_attend_across():
    layer = make_layer(num_kv_heads=2, window_size=2)
    x = torch.randn(1, 9, 32, dtype=F64)
    cu = torch.tensor([0, 4, 9])
    o = layer(x, cu_seqlens=cu)[0]
    for a, b in ((0, 4), (4, 9)):
        close(o[:, a:b], layer(x[:, a:b])[0])


def test_batched_layout_with_cu_seqlens_is_its_rows_end_to_end():
    # FLA's layer accepts a [B, T] batch with `cu_seqlens` and reads it as one packed row (FLA's
    # tests/layers/test_attn_varlen_pack_layout.py); a sequence may cross a row boundary
    layer = make_layer(num_kv_heads=2, window_size=3)
    x = torch.randn(2, 4, 32, dtype=F64)
    cu = torch.tensor([0, 3, 8])
    o = layer(x, cu_seqlens=cu)[0]
    close(o, layer(x.reshape(1, 8, 32), cu_seqlens=cu)[0].reshape(2, 4, 32), 1e-12)
    close(o.reshape(1, 8, 32)[:, 3:], layer_ref(layer, x.reshape(1, 8, 32)[:, 3:], torch.arange(5)[None], 3), 1e-6)
    cache = Cache()
    layer(x, past_key_values=cache, cu_seqlens=cu)
    assert cache[0]['attn_state'][0].shape == (2, 3, 16)   # FLA's cache layout: the rows, the window's last 3 keys


def test_autocast_bf16_matches_float32():
    layer = make_layer(num_kv_heads=2, window_size=3, qk_norm=True).float()
    x = torch.randn(2, 6, 32)
    want = layer(x)[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, _, _ = layer(x)
        cache = Cache()
        steps = torch.cat([layer(x[:, t:t + 1], past_key_values=cache)[0] for t in range(6)], 1)
    assert got.dtype == torch.bfloat16 and cache[0]['attn_state'][0].dtype == torch.bfloat16
    close(got.float(), want, 2e-2)
    close(steps.float(), want, 2e-2)


def test_bad_inputs_name_the_argument():
    with pytest.raises(InputError, match=r'`num_heads` \(4\) must be divisible by `num_kv_heads` \(3\)'):
        Attention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(InputError, match='`window_size` must be at least 1, got 0'):
        Attention(hidden_size=32, num_heads=4, window_size=0)
    with pytest.raises(InputError, match=r'`hidden_size` \(30\)'):
        Attention(hidden_size=30, num_heads=4)
    with pytest.raises(TypeError, match='`num_kv_heads` must be an integer'):
        Attention(hidden_size=32, num_heads=4, num_kv_heads=2.0)
    layer, x = make_layer(), torch.randn(2, 3, 32, dtype=F64)
    with pytest.raises(InputError, match='Arbitrary attention masks'):
        layer(x, attention_mask=torch.ones(2, 3, 3))
    with pytest.raises(InputError, match='attention_mask'):
        layer(x, attention_mask=torch.ones(2, 5))                      # no cache: one column a token
    with pytest.raises(InputError, match='hidden_states'):
        layer(x[..., :16])
    with pytest.raises(ValueError, match='requires `layer_idx`'):
        make_layer(layer_idx=None)(x, past_key_values=Cache())
    with pytest.raises(TypeError, match='FLACPContext'):
        layer(x, cp_context=object())
    cache = Cache()
    layer(x, past_key_values=cache)
    with pytest.raises(AssertionError, match='cu_seqlens should not be provided when past_key_values has content'):
        layer(x[:1], past_key_values=cache, cu_seqlens=torch.tensor([0, 3]))   # FLA's message, matched by its tests
    with pytest.warns(UserWarning, match='ignores the keyword argument `cu_seqlen`'):
        layer(x, cu_seqlen=None)


# ---------------------------------------------------------------- hybrid models

def hybrid(window=None, seed=0):
    torch.manual_seed(seed)
    config = GLAConfig(hidden_size=32, num_hidden_layers=3, num_heads=2, vocab_size=64, bos_token_id=None,
                       eos_token_id=None, use_short_conv=True,
                       attn={'layers': [0, 2], 'num_heads': 4, 'num_kv_heads': 2, 'window_size': window})
    model = GLAForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():   # larger weights than the initialisation: differences would show
            p.normal_(0, 0.3)
    return model


def test_hybrid_layout_and_errors():
    model = hybrid()
    assert [type(b.attn).__name__ for b in model.model.layers] == ['Attention', 'GatedLinearAttention', 'Attention']
    a = model.model.layers[2].attn
    assert (a.num_heads, a.num_kv_heads, a.window_size, a.max_position_embeddings, a.layer_idx) == (4, 2, None, 2048, 2)
    with pytest.raises(InputError, match="field 'num_heads' \\(3\\)"):
        GLAConfig(hidden_size=32, num_hidden_layers=2, attn={'layers': [0], 'num_heads': 3})
    from myfla_gla.export import DecodeStep
    with pytest.raises(InputError, match='`attn`'):
        DecodeStep(model)


@pytest.mark.parametrize('window', [None, 3])
def test_hybrid_generation_cached_equals_uncached(window):
    model = hybrid(window)
    prompt = torch.randint(0, 64, (2, 5))
    a = model.generate(prompt, max_new_tokens=6, do_sample=False)
    b = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    assert len(set(a[:, 5:].flatten().tolist())) > 1   # not one token over and over


def test_hybrid_left_padded_prompt_equals_alone():
    model = hybrid(window=3)
    long, short = torch.randint(1, 64, (1, 6)), torch.randint(1, 64, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(together[1, 6:], model.generate(short, max_new_tokens=5, do_sample=False)[0, 4:])
    assert torch.equal(together[0, 6:], model.generate(long, max_new_tokens=5, do_sample=False)[0, 6:])


def test_hybrid_masked_chunk_after_cache():
    "A padded batch continued from a cache by a chunk of several tokens (FLA raises NotImplementedError there)."
    from myfla_gla.models.gla import simple_generate
    model = hybrid(window=3)
    ids, mask = torch.randint(1, 64, (2, 6)), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(simple_generate(model, ids, attention_mask=mask, max_new_tokens=5), want)
    cache = Cache()
    with torch.no_grad():
        model(ids[:, :3], attention_mask=mask[:, :3], past_key_values=cache, use_cache=True)
    assert torch.equal(simple_generate(model, ids, attention_mask=mask, max_new_tokens=5, past_key_values=cache), want)


def test_hybrid_window_decodes_as_one_pass():
    model = hybrid(window=2)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        cache = Cache()
        steps = torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(7)], 1)
    close(steps, full, 1e-5)


def test_hybrid_packed_sequences_equal_separate():
    model = hybrid(window=3)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        packed = model(ids, cu_seqlens=torch.tensor([0, 4, 9])).logits
        close(packed[:, :4], model(ids[:, :4]).logits, 1e-5)
        close(packed[:, 4:], model(ids[:, 4:]).logits, 1e-5)


# ---------------------------------------------------------------- FLA's own classes

FLA_RUN = '''
    out = sys.argv[1]
    torch.manual_seed(0)
    config = GLAConfig(hidden_size=32, num_hidden_layers=3, num_heads=2, vocab_size=64, use_short_conv=True,
                       attn=[{'layers': [0], 'num_heads': 4, 'num_kv_heads': 2, 'window_size': 3},
                             {'layers': [2], 'num_heads': 2, 'qkv_bias': True, 'rope_theta': 500.}])
    model = GLAForCausalLM(config)
    model.save_pretrained(out)
    # FLA's attention layers on the CPU: flash-attn is the float64 stand-in; the rotary embedding, FLA's Triton
    # kernel, is this package's (compared with FLA's on a GPU, tests/gpu/test_attention_fla.py)
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    res = {}
    for i in (0, 2):
        layer = model.model.layers[i].attn.double()
        layer.rotary = myfla_gla.RotaryEmbedding(layer.head_dim, base=layer.rope_theta)
        res[f'{i}/plain'] = layer(x)[0]
        res[f'{i}/packed'] = layer(x[:1], cu_seqlens=torch.tensor([0, 2, 6]))[0]
        cache = Cache()                    # prompt of 4, then 2 tokens one by one
        res[f'{i}/steps'] = torch.cat([layer(x[:, :4], past_key_values=cache)[0]] +
                                      [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in (4, 5)], 1)
        res[f'{i}/steps_k'] = cache[i]['attn_state'][0]
        cache = Cache()                    # a left-padded prompt, then one token
        res[f'{i}/padded'] = torch.cat([layer(x[:, :5], attention_mask=mask[:, :5], past_key_values=cache)[0],
                                        layer(x[:, 5:], attention_mask=mask, past_key_values=cache)[0]], 1)
        res[f'{i}/padded_k'] = cache[i]['attn_state'][0]
        cache = Cache()                    # a chunk after the prompt (no mask)
        res[f'{i}/chunks'] = torch.cat([layer(x[:, :2], past_key_values=cache)[0],
                                        layer(x[:, 2:], past_key_values=cache)[0]], 1)
    torch.save(res, out + '/fla_outputs.pt')
    print('OK')
'''


@pytest.fixture(scope='module')
def fla_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fla_hybrid')
    run_with_fla('from fla.models import GLAConfig, GLAForCausalLM\nfrom fla.models.utils import Cache', FLA_RUN, folder)
    return folder


def test_fla_hybrid_checkpoint_loads_strict_and_layers_match(fla_run):
    from safetensors.torch import load_file
    stored = load_file(fla_run / 'model.safetensors')
    model = GLAForCausalLM.from_pretrained(fla_run)
    assert [type(b.attn).__name__ for b in model.model.layers] == ['Attention', 'GatedLinearAttention', 'Attention']
    ours = model.state_dict()
    assert set(ours) == set(stored)
    assert all(torch.equal(ours[k], v) for k, v in stored.items())
    assert model.model.layers[2].attn.q_proj.bias is not None and model.model.layers[0].attn.window_size == 3
    fla = torch.load(fla_run / 'fla_outputs.pt')
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32, dtype=F64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for i in (0, 2):
        layer = model.model.layers[i].attn.double()
        close(layer(x)[0], fla[f'{i}/plain'])
        close(layer(x[:1], cu_seqlens=torch.tensor([0, 2, 6]))[0], fla[f'{i}/packed'])
        cache = Cache()
        steps = torch.cat([layer(x[:, :4], past_key_values=cache)[0]] +
                          [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in (4, 5)], 1)
        close(steps, fla[f'{i}/steps'])
        close(cache[i]['attn_state'][0], fla[f'{i}/steps_k'])
        cache = Cache()
        padded = torch.cat([layer(x[:, :5], attention_mask=mask[:, :5], past_key_values=cache)[0],
                            layer(x[:, 5:], attention_mask=mask, past_key_values=cache)[0]], 1)
        close(padded, fla[f'{i}/padded'])
        close(cache[i]['attn_state'][0], fla[f'{i}/padded_k'])
        cache = Cache()
        chunks = torch.cat([layer(x[:, :2], past_key_values=cache)[0], layer(x[:, 2:], past_key_values=cache)[0]], 1)
        close(chunks, fla[f'{i}/chunks'])
