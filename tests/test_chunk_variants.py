"""chunk_gla's switchable internals on CPU, against the float64 recurrence: the dyadic levels for every chunk
(`_ONE_PRODUCT` off) with the smallest levels as broadcast products (`_BROADCAST_ROWS`), the forward's chunk states
kept for the backward (`_KEEP_STATES`), products of half-precision operands (`_HALF_PRODUCTS`; on a CPU with float32
products of the rounded operands, the tensor cores' numbers), and the decay floors when denormals are not flushed
(several threads) and when they are (one thread)."""
import pytest
import torch

import myfla_gla.ops.chunk as chunk
from myfla_gla import assert_close, chunk_gla, fused_chunk_gla, random_gla_inputs
from helpers import threads
from test_chunk import check


@pytest.mark.parametrize('rows, keep', [(1, False), (4, True), (64, True)])
def test_variants(monkeypatch, rows, keep):
    monkeypatch.setitem(chunk._ONE_PRODUCT, 'cpu', False)   # the levels for every chunk: `rows` is theirs
    monkeypatch.setitem(chunk._BROADCAST_ROWS, 'cpu', rows)
    monkeypatch.setitem(chunk._KEEP_STATES, 'cpu', keep)
    check(2, 100, 2, 16, 8, torch.float64, ratio=1e-11, fns=(chunk_gla,))
    check(1, 130, 2, 8, 8, torch.float64, cu=[0, 37, 37, 130], ratio=1e-11, fns=(chunk_gla,))
    check(1, 300, 2, 16, 16, torch.float32, normalizer=0.02, fns=(chunk_gla,))


# strong gates: bf16 at normaliser 0.02; fp16 at FLA's 0.1, since at 0.02 dg itself falls below fp16's normal range
# (relative RMS ~0.2 from its rounding alone, with float32 products too)
@pytest.mark.parametrize('dtype, normalizer', [(torch.bfloat16, 0.02), (torch.float16, 0.1)])
def test_half_products(monkeypatch, dtype, normalizer):
    "The forward's products with operands rounded to bf16/fp16 stay within FLA's half-precision bound; varlen too."
    monkeypatch.setitem(chunk._HALF_PRODUCTS, 'cpu', True)
    assert chunk._product_dtype(torch.ones(1, dtype=dtype)) == dtype
    assert chunk._product_dtype(torch.ones(1)) is None, 'float32 inputs keep float32 products'
    check(2, 200, 2, 64, 32, dtype)
    check(1, 300, 2, 32, 32, dtype, normalizer=normalizer)
    check(1, 130, 2, 32, 16, dtype, cu=[0, 37, 37, 130])


@pytest.mark.parametrize('op', [chunk_gla, fused_chunk_gla])
def test_half_products_round_the_forward_and_dv(monkeypatch, op):
    """The switch reaches the op: the output changes (the forward's products round their operands), and with it dv,
    which uses the forward's A (and in chunk_gla rounds its own two products too); dq, dk and dg, whose backward
    products are float32 (no kept states here), are bitwise those without it. The final state changes in chunk_gla,
    not in fused_chunk_gla, which rounds only stage 1's products (its state walk does not use A). In chunk_gla with
    dv's products in float32 only dv changes."""
    q, k, v, g = random_gla_inputs(2, 100, 2, 32, 16, dtype=torch.bfloat16)
    def run(half):
        monkeypatch.setitem(chunk._HALF_PRODUCTS, 'cpu', half)
        xs = [x.clone().requires_grad_() for x in (q, k, v, g)]
        o, ht = op(*xs, output_final_state=True)
        return o, ht, torch.autograd.grad(o, xs, torch.ones_like(o))
    (o0, ht0, (dq0, dk0, dv0, dg0)), (o1, ht1, (dq1, dk1, dv1, dg1)) = run(False), run(True)
    assert not torch.equal(o0, o1) and not torch.equal(dv0, dv1)
    assert torch.equal(ht0, ht1) == (op is fused_chunk_gla)
    for a, b in ((dq0, dq1), (dk0, dk1), (dg0, dg1)):
        assert torch.equal(a, b)
    if op is chunk_gla:   # dv's own rounding: its products in float32, the rest as before
        chunk_bwd = chunk._chunk_bwd
        monkeypatch.setattr(chunk, '_chunk_bwd', lambda *args, prod=None, **kw: chunk_bwd(*args, **kw))
        o2, ht2, (dq2, dk2, dv2, dg2) = run(True)
        assert not torch.equal(dv1, dv2)
        for a, b in ((o1, o2), (ht1, ht2), (dq1, dq2), (dk1, dk2), (dg1, dg2)):
            assert torch.equal(a, b)


def test_switched_on():
    x = torch.ones(1)
    assert chunk._switched_on({'cpu': True}, x) and not chunk._switched_on({'cpu': False}, x)
    assert not chunk._switched_on({'cuda': True}, x), 'another device type'
    assert not chunk._switched_on({'cpu': 'compiled'}, x), "'compiled': not in eager"
    assert torch.compile(lambda x: x + chunk._switched_on({'cpu': 'compiled'}, x), backend='eager')(x).item() == 2


def test_kept_states_twice(monkeypatch):
    "A kept state tensor is not changed by the backward: a second backward through the same graph agrees."
    monkeypatch.setitem(chunk._KEEP_STATES, 'cpu', True)
    q, k, v, g = (x.requires_grad_() for x in random_gla_inputs(1, 70, 2, 8, 8, dtype=torch.float64))
    o = chunk_gla(q, k, v, g)[0]
    first = torch.autograd.grad(o.sum(), (q, k, v, g), retain_graph=True)
    second = torch.autograd.grad(o.sum(), (q, k, v, g))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_row_dots_in_pieces():
    """`_row_dots` (the kept states' row sums with their gradients, eager) through a buffer of a few rows at a time: one
    row, pieces that do not divide the rows, all rows at once, and a buffer smaller than a row (one fused product).
    With V > C, as at gpu1 (V=128, C=64), the backward's buffer holds fewer rows than the states have."""
    x, y = torch.randn(2, 3, 5, 8, 6, dtype=torch.float64), torch.randn(2, 3, 5, 8, 6, dtype=torch.float64)
    want = (x * y).sum(-1)
    for rows in (1, 7, 240, 1000, 0.5):
        buf = torch.full((int(rows * 6),), float('nan'), dtype=x.dtype)   # dead values: never read
        assert_close(f'row sums, {rows} rows a piece', want, chunk._row_dots(x, y, buf), 1e-15, err_atol=0)


@pytest.mark.parametrize('n', [1, 2])
def test_denormals(n):
    "Strong gates in float32 with one thread (denormals flushed for the op) and two (decay factors floored)."
    with threads(n):
        check(1, 200, 2, 16, 16, torch.float32, normalizer=0.02, fns=(chunk_gla,))
        assert torch.tensor([1e-39]).mul_(1.)[0] != 0, 'the mode before the op is restored'


def test_tf32_products_switch(monkeypatch):
    """`_tf32_products` (`_TF32_PRODUCTS`, off by default: see the chunk chapter's design notes) sets PyTorch's TF32
    switch for cuBLAS's float32 products only for bf16/fp16 inputs on a device type where it is on, and restores the
    setting after the block, also when the block raises."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    x16, x32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    with chunk._tf32_products(x16):
        assert matmul.fp32_precision == before
    monkeypatch.setitem(chunk._TF32_PRODUCTS, 'cpu', True)
    with chunk._tf32_products(x32):
        assert matmul.fp32_precision == before
    with chunk._tf32_products(x16):
        assert matmul.fp32_precision == 'tf32'
    assert matmul.fp32_precision == before
    with pytest.raises(ZeroDivisionError), chunk._tf32_products(x16):
        1 / 0
    assert matmul.fp32_precision == before
