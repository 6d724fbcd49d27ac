"""Property-based and bad-input tests of the padding utilities (the notebook holds the worked examples)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from myfla_gla import (ACT2FN, assert_close, get_abs_err, get_err_ratio, get_unpad_data, index_first_axis, pad_input,
                       prepare_chunk_indices, prepare_chunk_offsets, prepare_position_ids, prepare_sequence_ids,
                       repad_hidden_states, unpad_hidden_states, unpad_input)

masks = st.integers(1, 5).flatmap(lambda b: st.integers(1, 9).flatmap(
    lambda t: st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=b, max_size=b)))


@settings(max_examples=60, deadline=None)
@given(masks)
def test_unpad_repad_roundtrip(mask):
    mask = torch.tensor(mask)
    B, T = mask.shape
    x = torch.randn(B, T, 3)
    packed, indices, cu = unpad_hidden_states(x, None, mask, T)
    # packed rows are each row's valid tokens, in order, row after row
    expected = torch.cat([x[b][mask[b].bool()] for b in range(B)])
    assert torch.equal(packed[0], expected)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + mask.sum(1).cumsum(0).tolist()
    y = repad_hidden_states(packed, indices, B, T)
    assert torch.equal(y, x * mask[..., None])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.sampled_from([1, 4, 16, 64]))
def test_chunk_indices_match_a_loop(lens, chunk_size):
    cu = torch.tensor([0] + lens).cumsum(0)
    want = [[n, c] for n, L in enumerate(lens) for c in range(-(-L // chunk_size))]
    assert prepare_chunk_indices(cu, chunk_size).tolist() == want
    assert prepare_chunk_offsets(cu, chunk_size).tolist() == [0] + torch.tensor(
        [-(-L // chunk_size) for L in lens]).cumsum(0).tolist()
    assert prepare_position_ids(cu).tolist() == [t for L in lens for t in range(L)]
    assert prepare_sequence_ids(cu).tolist() == [n for n, L in enumerate(lens) for _ in range(L)]


def test_mask_edited_in_place_is_not_stale():
    # FLA memoises get_unpad_data by tensor identity (spec 10.23); here the same object edited in place is re-read
    mask = torch.ones(2, 4, dtype=torch.int64)
    assert get_unpad_data(mask)[1].tolist() == [0, 4, 8]
    mask[0, :2] = 0
    assert get_unpad_data(mask)[1].tolist() == [0, 2, 6]


@pytest.mark.parametrize('bad, msg', [(torch.ones(2, 4, 4), 'attention_mask'), (torch.ones(4), 'attention_mask'),
                                      (torch.full((2, 3), 3), 'attention_mask')])
def test_bad_masks(bad, msg):
    with pytest.raises(ValueError, match=msg):
        unpad_hidden_states(torch.randn(2, 3, 4), None, bad, 3)


def test_mask_shorter_than_input_or_wrong_batch():
    with pytest.raises(ValueError, match='attention_mask'):
        unpad_hidden_states(torch.randn(2, 5, 4), None, torch.ones(2, 4), 5)
    with pytest.raises(ValueError, match='attention_mask'):
        unpad_hidden_states(torch.randn(2, 5, 4), None, torch.ones(3, 5), 5)


def test_unpad_input_prefill_and_decode():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    q, k = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    q_u, (k_u,), idx, (cu_q, cu_k), (mq, mk) = unpad_input(q, (k,), mask, 3)
    assert torch.equal(q_u, q.flatten(0, 1)[mask.flatten().bool()]) and torch.equal(cu_q, cu_k) and mq == mk == 3
    q1 = torch.randn(2, 1, 2, 4)
    q_u, _, idx, (cu_q, _), (mq, _) = unpad_input(q1, (k,), mask, 1, keepdim=True)
    assert q_u.shape == (1, 2, 2, 4) and cu_q.tolist() == [0, 1, 2] and cu_q.dtype == torch.int32 and mq == 1
    with pytest.raises(NotImplementedError, match='q_len'):
        unpad_input(q[:, :2], (k,), mask, 2)


def test_gradients_flow_through_gather_and_scatter():
    x = torch.randn(6, 3, requires_grad=True)
    idx = torch.tensor([5, 1])
    index_first_axis(x, idx).sum().backward()
    assert x.grad[[1, 5]].eq(1).all() and x.grad[[0, 2, 3, 4]].eq(0).all()
    rows = torch.randn(2, 3, requires_grad=True)
    (pad_input(rows, idx, 2, 3) * torch.arange(6.)[..., None].reshape(2, 3, 1)).sum().backward()
    assert rows.grad[:, 0].tolist() == [5., 1.]


def test_activations_keep_dtype_and_reject_unknown():
    x = torch.randn(10, dtype=torch.float16)
    for name in ['relu', 'sigmoid', 'logsigmoid', 'silu', 'swish', 'sqrelu', 'gelu', 'identity']:
        y = ACT2FN[name](x)
        assert y.dtype == torch.float16
        ref = ACT2FN[name](x.double())
        assert_close(name, ref, y, 1e-3, err_atol=0)
    with pytest.raises(KeyError, match='tanh'):
        ACT2FN['tanh']


def test_check_helpers_have_one_definition():
    """FLA's metric (`fla.utils`'s names) is defined in `myfla_gla.utils`, the bottom of the package; the harness
    and the top level give the same objects. The rest of the harness lives in `myfla_gla.testing` only."""
    import myfla_gla
    from myfla_gla import testing, utils
    for name in ('get_abs_err', 'get_err_ratio', 'assert_close', 'DEFAULT_RATIO'):
        assert getattr(myfla_gla, name) is getattr(testing, name) is getattr(utils, name), name
        assert name in utils.__all__ and name in vars(utils) and name in testing.__all__, name
    for name in ('random_gla_inputs', 'check_devices', 'check_dtypes', 'fla_available'):
        assert getattr(myfla_gla, name) is getattr(testing, name), name
        assert name not in vars(utils) and name not in utils.__all__, name
    with pytest.raises(AttributeError, match='no_such_name'):
        utils.no_such_name


def test_assert_close_behaves_as_fla(caplog):
    """FLA's `assert_close` (spec 9.1): passes outright when the max abs error is at most `err_atol` (1e-6 by
    default), else needs the relative RMS error strictly below `ratio`; `warning=True` warns instead of failing
    above it; NaN fails even then; FLA's line is logged at INFO. Ours also returns the two errors."""
    import logging
    import warnings
    ref = torch.linspace(1, 2, 100, dtype=torch.float64)
    err, abs_err = assert_close('tiny', ref, ref + 5e-7, 1e-12)                  # 5e-7 <= err_atol: passes
    assert abs_err == pytest.approx(5e-7) and err == pytest.approx(5e-7 / ref.square().mean().sqrt().item())
    with pytest.raises(AssertionError, match='tiny'):
        assert_close('tiny', ref, ref + 5e-7, 1e-12, err_atol=0)
    x = ref * 1.01                                                               # relative error exactly 0.01
    ratio = get_err_ratio(ref, x)
    with pytest.raises(AssertionError):
        assert_close('at the bound', ref, x, ratio)                            # strictly below, as FLA
    assert_close('below', ref, x, ratio * 1.001)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert_close('warn', ref, x, 1e-3, warning=True)
        assert_close('at the bound', ref, x, ratio, warning=True)               # FLA warns only above it
    assert [str(m.message).strip().startswith('warn diff') for m in w] == [True]
    with pytest.raises(AssertionError, match='NaN'):
        assert_close('nan', ref, torch.full_like(ref, float('nan')), 1., warning=True)
    with caplog.at_level(logging.INFO, logger='myfla_gla.utils'):
        assert_close('logged', ref, ref, 1e-12)
    assert 'logged diff: 0.000000 ratio: 0.000000' in caplog.text
    assert get_abs_err(x=ref, y=x) == pytest.approx(0.02) and get_err_ratio(x=ref, y=x) == pytest.approx(ratio)
