"""FLA parity of HGRN2 on CUDA: FLA 0.6.0's `HGRN2Attention` and `HGRN2ForCausalLM` (Triton kernels) with random
weights hand their `state_dict` to ours (`strict=True`); outputs, every gradient (the lower bound's too), packed and
masked input, caches through decoding and greedy generation must match. Our `fused_chunk` is compared with FLA's
`chunk` (FLA 0.6.0's `fused_chunk_gla` raises). Skipped without CUDA or without FLA."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)
fla_layers = pytest.importorskip('fla.layers')
from fla.models import HGRN2Config as FLAHGRN2Config, HGRN2ForCausalLM as FLAHGRN2ForCausalLM  # noqa: E402
from fla.models.utils import Cache as FLACache  # noqa: E402

from myfla_gla import Cache, HGRN2Attention, HGRN2Config, HGRN2ForCausalLM, assert_close  # noqa: E402

# relative RMS error bounds between FLA and us, (outputs and states, gradients): FLA's float32 uses tf32 matmuls
RATIO = {torch.float32: (5e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}
D = 128


def layer_pair(mode, conv, dtype, seed=0):
    "FLA's layer (random norm weight) and ours with its state dict, in `dtype` on CUDA; layer 1, so bounds apply."
    kw = dict(hidden_size=D, expand_ratio=32, use_short_conv=conv, conv_size=4, layer_idx=1)
    torch.manual_seed(seed)
    theirs = fla_layers.HGRN2Attention(mode='chunk' if mode == 'fused_chunk' else mode, **kw)
    with torch.no_grad():
        theirs.g_norm.weight.uniform_(0.5, 1.5)
    theirs = theirs.to('cuda', dtype)
    ours = HGRN2Attention(mode=mode, **kw).to('cuda', dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.g_norm.weight.dtype == theirs.g_norm.weight.dtype
    return theirs, ours


def inputs(kind, dtype, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == 'packed':
        x = torch.randn(1, 3 * T, D, generator=g).to('cuda', dtype)
        return x, {'cu_seqlens': torch.tensor([0, T, T + 7, 3 * T], dtype=torch.int32, device='cuda')}
    x = torch.randn(3, T, D, generator=g).to('cuda', dtype)
    if kind == 'mask':
        mask = torch.ones(3, T, dtype=torch.long, device='cuda')
        mask[0, :T // 3], mask[2, :T - 5] = 0, 0
        return x, {'attention_mask': mask}
    return x, {}


def forward_backward(layer, x, bound, kw):
    x, bound = x.detach().clone().requires_grad_(), bound.detach().clone().requires_grad_()
    o = layer(x, lower_bound=bound, **kw)[0]
    w = torch.linspace(-1, 1, o.numel(), device='cuda').view_as(o)
    (o.float() * w).sum().backward()
    return o, {'x': x.grad, 'lower_bound': bound.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
# up to 64 tokens every mode is the recurrent one (FLA's rule): one mode there, each mode on 150 tokens
@pytest.mark.parametrize('mode,T', [('chunk', 40), ('chunk', 150), ('fused_recurrent', 150), ('fused_chunk', 150)])
@pytest.mark.parametrize('kind,conv', [('plain', False), ('mask', True), ('packed', True)])
def test_layer_matches_fla(mode, kind, conv, T, dtype):
    theirs, ours = layer_pair(mode, conv, dtype)
    x, kw = inputs(kind, dtype, T)
    bound = torch.rand(D, device='cuda') * 0.9          # float32, as the model makes it
    o1, g1 = forward_backward(theirs, x, bound, dict(kw))
    o2, g2 = forward_backward(ours, x, bound, dict(kw))
    fwd, bwd = RATIO[dtype]
    assert o1.dtype == o2.dtype == dtype
    assert_close(f'{mode} {kind} output', o1, o2, fwd, err_atol=1e-6)
    for name in g1:
        assert_close(f'{mode} {kind} d{name}', g1[name], g2[name], bwd, err_atol=1e-6)


@pytest.mark.parametrize('mode', ['chunk', 'fused_recurrent'])
def test_layer_cache_matches_fla(mode):
    "A 100-token prefill and 3 single-token steps: outputs, recurrent state [N, H, V, K] and conv windows."
    theirs, ours = layer_pair(mode, True, torch.float32)
    x, _ = inputs('plain', torch.float32, 103)
    bound = torch.rand(D, device='cuda') * 0.9
    caches = (FLACache(), Cache())
    outs = [[], []]
    with torch.no_grad():
        for layer, cache, out in zip((theirs, ours), caches, outs):
            out.append(layer(x[:, :100], lower_bound=bound, past_key_values=cache, use_cache=True)[0])
            for t in range(100, 103):
                out.append(layer(x[:, t:t + 1], lower_bound=bound, past_key_values=cache, use_cache=True)[0])
    fwd = RATIO[torch.float32][0]
    for i, (a, b) in enumerate(zip(*outs)):
        assert_close(f'{mode} step {i}', a, b, fwd, err_atol=1e-6)
    a, b = caches[0][1], caches[1][1]
    assert a['recurrent_state'].shape == b['recurrent_state'].shape == (3, 4, 32, 32)
    assert_close(f'{mode} recurrent_state', a['recurrent_state'], b['recurrent_state'], fwd, err_atol=1e-6)
    for i, (ca, cb) in enumerate(zip(a['conv_state'], b['conv_state'])):
        assert_close(f'{mode} conv_state[{i}]', ca, cb, fwd, err_atol=1e-6)


MODEL = dict(hidden_size=D, num_hidden_layers=3, expand_ratio=32, vocab_size=1000, bos_token_id=None,
             eos_token_id=None)


def model_pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    fla = FLAHGRN2ForCausalLM(FLAHGRN2Config(**MODEL, **kw))
    with torch.no_grad():   # FLA starts the bounds at zero: make them differ by layer and channel
        fla.model.lower_bounds.normal_()
    fla = fla.to('cuda', dtype).eval()
    ours = HGRN2ForCausalLM(HGRN2Config(**MODEL, **kw)).to('cuda', dtype).eval()
    ours.load_state_dict(fla.state_dict(), strict=True)
    return fla, ours


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('kw', [{}, dict(use_short_conv=True, attn_mode='fused_recurrent')], ids=['default', 'conv'])
def test_model_logits_loss_and_gradients_match_fla(kw, dtype):
    fla, ours = model_pair(dtype, **kw)
    fwd, bwd = RATIO[dtype]
    ids = torch.randint(0, 1000, (2, 150), device='cuda')
    for m in (fla, ours):
        m.train()
    a, b = fla(ids, labels=ids), ours(ids, labels=ids)
    assert_close('logits', a.logits.float(), b.logits.float(), fwd, err_atol=0)
    assert_close('loss', a.loss.float(), b.loss.float(), fwd, err_atol=0)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(fla.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(f'grad {n}', theirs[n].grad.float(), p.grad.float(), bwd, err_atol=1e-6)


def test_model_packed_masked_cached_and_generated_match_fla():
    fla, ours = model_pair(use_short_conv=True)
    fwd = RATIO[torch.float32][0]
    B, T = 3, 100
    ids = torch.randint(0, 1000, (B, T + 4), device='cuda')
    mask = torch.ones_like(ids)
    mask[1, :20], mask[2, :77] = 0, 0
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device='cuda')
    with torch.no_grad():
        a, b = fla(ids[:, :T].reshape(1, -1), cu_seqlens=cu).logits, ours(ids[:, :T].reshape(1, -1), cu_seqlens=cu).logits
        assert_close('packed logits', a, b, fwd, err_atol=0)
        steps = []
        for m in (fla, ours):
            out = m(ids[:, :T], attention_mask=mask[:, :T], use_cache=True)
            cache, got = out.past_key_values, [out.logits]
            for t in range(T, T + 4):
                out = m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                got.append(out.logits)
            steps.append(torch.cat(got, 1))
        assert_close('masked, decoded logits', steps[0][mask.bool()], steps[1][mask.bool()], fwd, err_atol=0)
        for m in (fla, ours):   # sharpen the logits: argmax not decided by rounding
            m.lm_head.weight.mul_(30)
    prompt = ids[:, :T]
    a = fla.generate(prompt, attention_mask=mask[:, :T], max_new_tokens=16, do_sample=False)
    b = ours.generate(prompt, attention_mask=mask[:, :T], max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b), (a[:, T:], b[:, T:])
