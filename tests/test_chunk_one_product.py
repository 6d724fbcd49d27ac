"""The intra-chunk attention in one product (`_ONE_PRODUCT`, on for CPUs and CUDA): chunk_gla and
fused_chunk_gla against the float64 recurrence (outputs, final states, every gradient) where every chunk takes one
product, where every chunk is flagged and takes the dyadic levels, and where one batch mixes both (calls counted);
odd lengths, one token, packed sequences with empty ones, bf16 and fp16 (also with half-precision products); the span
limit at its edge. torch.compile with both branches of its `torch.cond`: `test_chunk.py::test_compile_matches_eager`."""
import pytest
import torch

import myfla_gla.ops.chunk as chunk
from myfla_gla import assert_close, chunk_gla, fused_chunk_gla
from myfla_gla.testing import compare_op, op_inputs, run_reference
from helpers import threads
from test_chunk import NAMES, check


@pytest.fixture
def one_product(monkeypatch):
    "The switch on for the CPU; the chunks each form's forward and backward was called for, call by call."
    monkeypatch.setitem(chunk._ONE_PRODUCT, 'cpu', True)
    calls = {'levels': [], 'levels_bwd': [], 'one': [], 'one_bwd': []}
    for key, name in (('levels', '_intra_levels'), ('levels_bwd', '_intra_bwd_levels'), ('one', '_intra_one_product'),
                      ('one_bwd', '_intra_bwd_one_product')):
        def counted(q, *args, _fn=getattr(chunk, name), _key=key, **kw):
            calls[_key].append(q.shape[:-2].numel())   # chunks (times heads) computed
            return _fn(q, *args, **kw)
        monkeypatch.setattr(chunk, name, counted)
    return calls


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('normalizer', [16, 1, 0.1, 0.02])
def test_one_product(one_product, normalizer, dtype):
    "Normalisers 16 and 1: every chunk in one product; 0.1 and 0.02: every chunk flagged (span > 40), the levels."
    check(2, 100, 2, 16, 8, dtype, normalizer)   # chunks of 64: the second one partial
    flagged = normalizer < 1
    n = 2 * 2 * 2 * 2                             # B x chunks x heads, in chunk_gla and fused_chunk_gla
    assert sum(one_product['one']) == sum(one_product['one_bwd']) == (0 if flagged else n)
    assert sum(one_product['levels']) == sum(one_product['levels_bwd']) == (n if flagged else 0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('strong', [[1], [1, 3]])
def test_mixed_batch(one_product, dtype, strong):
    """Heads with weak gates take one product, heads with gates of -25 a token the levels, in one batch: one strong
    head of four (a quarter of the chunks flagged) takes the levels for its chunks alone; two of four (half flagged),
    the levels for all chunks, which then cost less than both forms."""
    x = op_inputs('cpu', dtype, 2, 100, 4, 16, 8, seed=None)
    x['g'][:, :, strong] *= 50
    ref = run_reference(x)
    for fn in (chunk_gla, fused_chunk_gla):
        compare_op(fn, x, 'g', reference=ref)
    mixed = len(strong) == 1
    assert one_product['levels'] == one_product['levels_bwd'] == [2 * 2 if mixed else 2 * 2 * 4] * 2   # in each op
    assert one_product['one'] == one_product['one_bwd'] == ([2 * 2 * 4] * 2 if mixed else [])


@pytest.mark.parametrize('B, T, H, K, V, dtype, normalizer, cu, state_v_first, lean', [
    (2, 100, 2, 16, 8, torch.float32, 16, None, False, True),     # two chunks, the second partial
    (1, 1, 2, 8, 8, torch.float32, 1, None, False, True),         # one token
    (2, 130, 3, 32, 16, torch.bfloat16, 1, None, True, True),     # the [V, K] state layout
    (1, 90, 2, 16, 16, torch.float16, 1, [0, 0, 17, 90], False, True),   # packed, one sequence empty
    (2, 100, 2, 16, 8, torch.float32, 0.02, None, False, False)])  # flagged chunks: the usual forward
def test_lean_forward(monkeypatch, B, T, H, K, V, dtype, normalizer, cu, state_v_first, lean):
    """`chunk_gla`'s forward through `_chunk_fwd_lean` (`_LEAN_FORWARD`, on for CUDA) on one CPU thread (no floors,
    as on CUDA): every output and gradient against the float64 recurrence, where it applies; `fused_chunk_gla` and
    batches with a flagged chunk take the usual forward."""
    monkeypatch.setitem(chunk._ONE_PRODUCT, 'cpu', True)
    monkeypatch.setitem(chunk._LEAN_FORWARD, 'cpu', True)
    calls = []
    monkeypatch.setattr(chunk, '_chunk_fwd_lean', lambda *a, fn=chunk._chunk_fwd_lean: calls.append(1) or fn(*a))
    with threads(1):
        check(B, T, H, K, V, dtype, normalizer, cu=cu, state_v_first=state_v_first, fns=(chunk_gla,))
        assert len(calls) == lean, calls
        check(B, T, H, K, V, dtype, normalizer, cu=cu, state_v_first=state_v_first, fns=(fused_chunk_gla,))
        assert len(calls) == lean, calls


@pytest.mark.parametrize('dtype, normalizer, fwd_flagged', [(torch.bfloat16, 1, False), (torch.float16, 16, False),
                                                            (torch.float16, 1, True)])
def test_half_products(one_product, monkeypatch, dtype, normalizer, fwd_flagged):
    """With the forward's products of bf16/fp16 operands (`_HALF_PRODUCTS`) the span limit is the product dtype's: 40
    for bf16, 4 for fp16, whose chunks at normaliser 1 (spans of about 16) take the levels in the forward; the
    backward's products stay float32 (limit 40), so there they take one product."""
    monkeypatch.setitem(chunk._HALF_PRODUCTS, 'cpu', True)
    check(2, 100, 2, 32, 16, dtype, normalizer, fns=(chunk_gla,))
    assert sum(one_product['levels']) == (8 if fwd_flagged else 0) and one_product['levels_bwd'] == []
    assert sum(one_product['one']) == (0 if fwd_flagged else 8) and sum(one_product['one_bwd']) == 8


@pytest.mark.parametrize('T', [1, 3, 65, 129])
def test_lengths(one_product, T):
    "One token (a chunk of 1: no pair), odd lengths and partial last chunks, float64 and float32."
    check(2, T, 2, 8, 4, torch.float64, ratio=1e-12)
    check(1, T, 2, 8, 4, torch.float32, normalizer=0.1)


@pytest.mark.parametrize('normalizer', [1, 0.1])
def test_varlen(one_product, normalizer):
    "Packed sequences with empty ones (and one of one token), weak and strong gates."
    check(1, 131, 2, 16, 8, torch.float32, normalizer, cu=[0, 0, 37, 37, 38, 131])


@pytest.mark.parametrize('dtype, prod, limit', [(torch.float32, None, 40), (torch.float64, None, 350),
                                                (torch.float32, torch.bfloat16, 40), (torch.float32, torch.float16, 4)])
def test_span_limit(dtype, prod, limit):
    """A chunk whose span (half its decay after the first token) is just below the limit of the products' dtype takes
    one product and is exact and finite, with |q|, |k| up to 100, where the products above the diagonal overflow (they
    are masked); just above the limit, it is flagged. The first gate does not count: it enters no pair."""
    C, K = 64, 16
    q, k = 100 * torch.rand(2, C, K, dtype=dtype), 100 * torch.rand(2, C, K, dtype=dtype)
    g = torch.full((2, C, K), -2 * limit / (C - 1), dtype=dtype)
    g[0] *= 1 - 1e-3                                  # span 0.999 limit
    g[1] *= 1 + 1e-3                                  # span 1.001 limit
    g[:, 0] = -1000.                                  # a first gate that closes: no pair holds it
    assert chunk._flagged(g, prod).tolist() == [False, True]
    if prod is not None:
        return
    q, k, g = q[:1], k[:1], g[:1]
    A, decay_q, decay_k = chunk._intra_one_product(q, k, g.clone())
    b = g.double().index_fill(-2, torch.tensor(0), 0).cumsum(-2)   # b - b_0: exact differences in float64
    ref = torch.einsum('...tk,...sk,...tsk->...ts', q.double(), k.double(),
                       (b[..., :, None, :] - b[..., None, :, :]).exp()).tril()
    bound = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.isfinite(A).all() and torch.isfinite(decay_k).all()
    assert_close('A at the span limit', ref, A, bound, err_atol=0)
    assert_close('decay_k', (b[..., -1:, :] - b).exp(), decay_k, bound, err_atol=0)
    _, _, up, down = chunk._factors(g.clone())
    assert not torch.isfinite((q * up) @ (k * down).transpose(-1, -2)).all(), 'unmasked, the product overflows'


def test_span_limit_in_the_op(one_product):
    "The op at the limit's edge, forward and backward: heads 0, 2, 3 just below it (one product), head 1 just above."
    x = op_inputs('cpu', torch.float32, 1, 64, 4, 16, 8, seed=None)
    for h in range(4):
        x['g'][:, 1:, h] = -80 / 63 * (1 + 1e-3 if h == 1 else 1 - 1e-3)
    compare_op(chunk_gla, x, 'g')
    assert one_product['levels'] == one_product['levels_bwd'] == [1]
    assert one_product['one'] == one_product['one_bwd'] == [4]


def test_compiled_cond_takes_the_common_case_as_its_true_branch(monkeypatch):
    """Compiled, `_by_span`'s `torch.cond` has the one product (no chunk flagged, the common case) as its true branch:
    Inductor frees a cond's operands only on its true path (on the false one q and k's stack and g would stay live to
    the graph's end: 384 MiB at gpu1). Run eagerly with `is_compiling` faked, the cond recorded, both cases."""
    preds = []
    def cond(pred, true_fn, false_fn, ops):
        preds.append(bool(pred))
        return (true_fn if pred else false_fn)(*ops)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    monkeypatch.setattr(torch, 'cond', cond)
    q, k = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 4)
    for scale, want in ((1., True), (100., False)):   # weak gates: nothing flagged; strong: some chunks flagged
        g = torch.nn.functional.logsigmoid(torch.randn(2, 3, 8, 4)) * scale
        flagged = chunk._flagged(g)
        assert bool(flagged.any()) != want
        A, *_ = chunk._by_span(chunk._intra_one_product, chunk._intra_levels, flagged, (q, k, g))
        assert preds[-1] == want
        assert_close(f'A, gates x{scale}', chunk._intra_levels(q, k, g)[0], A, 1e-5, err_atol=0)
