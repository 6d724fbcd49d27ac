"""`myfla_gla.modules.linear.Linear` (nbs/02a_linear.ipynb): the split product for a few rows on a CPU gives
`F.linear`'s numbers, runs only where it should, and leaves hooks, `torch.compile`, export and the models as they were.
The README's test command runs with one thread, where the split never runs: these tests set two."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from myfla_gla import GLAConfig, GLAForCausalLM
from myfla_gla.modules import linear as L
from myfla_gla.modules.linear import Linear
from helpers import threads


@pytest.fixture
def bmm_calls(monkeypatch):
    "How many times `torch.bmm` ran (the split's one product per call)."
    calls, bmm = [], torch.bmm
    monkeypatch.setattr(torch, 'bmm', lambda *a, **k: calls.append(1) or bmm(*a, **k))
    return calls


def pair(n_in=1024, n_out=768, bias=True):
    torch.manual_seed(0)
    proj = Linear(n_in, n_out, bias=bias)
    plain = nn.Linear(n_in, n_out, bias=bias)
    plain.load_state_dict(proj.state_dict())
    return proj, plain


@pytest.mark.parametrize('shape', [(1024,), (1, 1024), (1, 1, 1024), (3, 1, 1024), (8, 1, 1024), (2, 4, 1024)])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('n', [2, 3])
def test_split_equals_linear(shape, bias, n, bmm_calls):
    proj, plain = pair(bias=bias)   # 768 outputs: slices for 2 and 3 threads
    x = torch.randn(shape)
    with threads(n), torch.no_grad():
        out = proj(x)
    assert bmm_calls == [1]
    ref = plain(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # against float64: as close as F.linear's own float32 rounding
    exact = F.linear(x.double(), plain.weight.double(), None if plain.bias is None else plain.bias.double())
    assert (out.double() - exact).abs().max() <= 4 * (ref.double() - exact).abs().max() + 1e-6


def test_where_it_takes_f_linear(bmm_calls):
    "Every case outside the split's conditions is `F.linear`, bitwise."
    proj, plain = pair()
    x = torch.randn(1, 1024)
    with threads(2):
        with torch.no_grad():
            cases = {
                'more rows than _SPLIT_ROWS': (proj, torch.randn(L._SPLIT_ROWS + 1, 1024)),
                'float64': (pair()[0].double(), x.double()),
                'bf16': (pair()[0].bfloat16(), x.bfloat16()),
            }
            small = Linear(64, 64)
            cases['a weight below _SPLIT_MIN'] = (small, torch.randn(1, 64))
            odd = Linear(1024, 769)
            cases['outputs that do not split evenly'] = (odd, x)
            bare = Linear(1024, 768)
            del bare.weight
            bare.weight = torch.randn(768, 1024)   # not an nn.Parameter (as quantized or distributed weights)
            cases['a weight that is not a plain parameter'] = (bare, x)
            for why, (m, inp) in cases.items():
                assert torch.equal(m(inp), F.linear(inp, m.weight, m.bias)), why
            with torch.autocast('cpu', dtype=torch.bfloat16):
                assert proj(x).dtype == torch.bfloat16   # autocast's F.linear
        out = proj(x)   # gradients enabled: training takes F.linear
        assert out.requires_grad and torch.equal(out, plain(x))
    with threads(1), torch.no_grad():
        assert torch.equal(proj(x), plain(x))
    assert bmm_calls == []


def test_hooks_state_dict_and_type():
    proj, plain = pair()
    seen = []
    proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with threads(2), torch.no_grad():
        proj(torch.randn(1, 1024))
    assert seen == [torch.Size([1, 768])]
    assert isinstance(proj, nn.Linear) and repr(proj) == repr(plain)
    assert proj.state_dict().keys() == plain.state_dict().keys()
    proj.__class__ = nn.Linear   # the subclass adds no state: a plain nn.Linear again
    x = torch.randn(2, 1024)
    assert torch.equal(proj(x), plain(x))


def test_compiled_and_exported(bmm_calls):
    "Compiled, the thread count is a constant of the graph and the split runs; exported, the program keeps F.linear."
    proj, plain = pair(bias=False)
    x = torch.randn(1, 1, 1024)
    with threads(2), torch.no_grad():
        compiled = torch.compile(proj, fullgraph=True, dynamic=False, backend='aot_eager')
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
        program = torch.export.export(proj, (x,))
        # a dynamic row count: no guard on it (the split's row limit is not read while exporting)
        rows = torch.randn(3, 1024)
        dynamic = torch.export.export(proj, (rows,), dynamic_shapes=({0: torch.export.Dim('rows', max=4096)},))
    for p in (program, dynamic):
        ops = {str(n.target) for n in p.graph.nodes if n.op == 'call_function'}
        assert 'aten.linear.default' in ops and not any('bmm' in o for o in ops), ops
    torch.testing.assert_close(program.module()(x), plain(x))
    for n in (1, 8, 100):
        x = torch.randn(n, 1024)
        torch.testing.assert_close(dynamic.module()(x), plain(x))


def test_model_decodes_the_same_tokens_split_or_not(bmm_calls):
    """A GLA model large enough for the split: logits of prompt and steps, and greedy tokens, with 1 thread (no split)
    and 2 (the split in the head and the MLP at every step)."""
    torch.manual_seed(0)
    cfg = GLAConfig(hidden_size=512, num_hidden_layers=2, num_heads=4, vocab_size=1024, use_short_conv=False)
    model = GLAForCausalLM(cfg).eval()
    assert isinstance(model.lm_head, Linear) and isinstance(model.model.layers[0].attn.q_proj, Linear)
    ids = torch.randint(0, 1024, (2, 9))
    runs, splits = {}, {}
    for n in (1, 2):
        bmm_calls.clear()
        with threads(n), torch.no_grad():
            out = model(ids, use_cache=True)
            steps, nxt = [out.logits[:, -1]], out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits[:, -1])
                nxt = out.logits[:, -1:].argmax(-1)
            runs[n], splits[n] = torch.stack(steps, 1), len(bmm_calls)
    # the split ran with 2 threads only, for each weight of at least _SPLIT_MIN elements at each of the 4 steps: per
    # layer v, g, o, gate, up, down (512 x 512 and more), and the head; the prompt (18 rows) takes F.linear. The other
    # `torch.bmm` calls, the ops' own, are the same with 1 and 2 threads
    assert splits[2] - splits[1] == 4 * (2 * 6 + 1), splits
    torch.testing.assert_close(runs[2], runs[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[2].argmax(-1), runs[1].argmax(-1))
