"""Cache: FLA's own cache tests (tests/models/test_cache.py, rewritten for `myfla_gla.Cache`), the overwrite rules
the GLA layer relies on, transformers' Cache interface, and the cache without transformers installed."""
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from myfla_gla import Cache, FLACache, FLALayer, get_layer_cache, require_cache_layer_idx, update_layer_cache


def attn_state(start, length, batch_size=1, num_heads=2, head_dim=3):
    "Keys hold their token position, values position + 1000: window contents can be checked exactly."
    pos = torch.arange(start, start + length, dtype=torch.float32).view(1, length, 1, 1)
    k = pos.expand(batch_size, length, num_heads, head_dim).contiguous()
    return k, k + 1000


def tokens_of(state):
    return state[0][0, :, 0, 0].tolist(), state[1][0, :, 0, 0].tolist()


def test_layer_reports_no_max_length():
    layer = FLALayer()
    assert layer.get_max_cache_shape() == -1 and layer.get_max_length() == -1
    assert Cache().get_max_cache_shape() == -1 and Cache().get_max_length() == -1


@pytest.mark.parametrize('num_layers, batch_size, seq_len', [(4, 2, 10), (8, 1, 20)])
def test_per_layer_seq_length(num_layers, batch_size, seq_len):
    cache = Cache()
    for i in range(num_layers):
        assert cache.get_seq_length(i) == 0
        cache.update(attn_state=attn_state(0, seq_len, batch_size), layer_idx=i)
        assert cache.get_seq_length(i) == seq_len
        assert cache.get_seq_length(i + 1) == 0
    assert [cache.get_seq_length(i) for i in range(num_layers)] == [seq_len] * num_layers


@pytest.mark.parametrize('num_layers, chunk, n_chunks', [(4, 5, 4), (2, 10, 3)])
def test_incremental_update(num_layers, chunk, n_chunks):
    cache = Cache()
    for c in range(n_chunks):
        for i in range(num_layers):
            cache.update(attn_state=attn_state(c * chunk, chunk), layer_idx=i)
            assert cache.get_seq_length(i) == (c + 1) * chunk
            assert tokens_of(cache[i]['attn_state'])[0] == list(range((c + 1) * chunk))


def test_seq_length_of_missing_layers():
    cache = Cache()
    assert cache.get_seq_length(0) == cache.get_seq_length(5) == cache.get_seq_length(None) == 0
    cache.update(attn_state=attn_state(0, 10), layer_idx=0)
    assert cache.get_seq_length(None) == cache.get_seq_length(0) == 10


def test_window_counts_every_token():
    cache = Cache()
    cache.update(attn_state=attn_state(0, 100), layer_idx=0, cache_kwargs={'window_size': 10})
    assert cache.get_seq_length(0) == 100
    assert tokens_of(cache[0]['attn_state'])[0] == list(range(90, 100))


@pytest.mark.parametrize('first, second, window', [(4, 6, 4), (2, 4, 4), (3, 1, 4), (4, 1, 4), (6, 2, 4)])
def test_window_keeps_the_tail(first, second, window):
    cache = Cache()
    for start, n in ((0, first), (first, second)):
        cache.update(attn_state=attn_state(start, n), layer_idx=0, offset=n, cache_kwargs={'window_size': window})
    keys, values = tokens_of(cache[0]['attn_state'])
    expected = list(range(max(0, first + second - window), first + second))
    assert keys == expected and values == [t + 1000 for t in expected]
    assert cache.get_seq_length(0) == first + second
    # the window is remembered by the layer once given
    cache.update(attn_state=attn_state(first + second, 1), layer_idx=0)
    assert tokens_of(cache[0]['attn_state'])[0] == list(range(max(0, first + second + 1 - window), first + second + 1))


def test_layer_reset():
    layer = FLALayer()
    layer.update(attn_state=attn_state(0, 5))
    assert layer.state is not None and layer.get_seq_length() == 5
    layer.reset()
    assert layer.state is None and layer.get_seq_length() == 0
    layer.update(attn_state=attn_state(20, 2))
    assert layer.get_seq_length() == 2 and tokens_of(layer.state['attn_state'])[0] == [20, 21]


def test_cache_reset_keeps_the_records():
    cache = Cache()
    for i in range(2):
        cache.update(attn_state=attn_state(10 * i, 3), layer_idx=i, offset=3)
    cache.reset()
    assert cache.get_seq_length(0) == 0 and len(cache) == 2 and cache[0] is None and cache[1] is None


def test_from_legacy_keeps_seen_tokens():
    legacy = {'recurrent_state': None, 'attn_state': attn_state(10, 4), 'conv_state': None, 'ffn_state': None}
    cache = Cache.from_legacy_cache([legacy, None], seen_tokens=17)
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 17
    assert tokens_of(cache[0]['attn_state'])[0] == [10, 11, 12, 13]
    assert cache[1] is None and len(cache) == 2
    assert cache[0] is not legacy and cache[0] == legacy       # a copy of the dict, the same tensors


def test_from_legacy_of_an_fla_legacy_cache():
    class LegacyLike:                      # FLA's LegacyFLACache: `states` and one global counter
        states = [{'recurrent_state': torch.ones(1), 'attn_state': None, 'conv_state': None, 'ffn_state': None}]
        def get_seq_length(self):
            return 9
    cache = Cache.from_legacy_cache(LegacyLike())
    assert cache.get_seq_length(0) == 9 and torch.equal(cache[0]['recurrent_state'], torch.ones(1))


@pytest.mark.parametrize('num_layers, seq_len', [(4, 1), (8, 1), (4, 3)])
def test_decode_all_layers_see_the_same_past_length(num_layers, seq_len):
    cache = Cache()
    for i in range(num_layers):
        cache.update(attn_state=attn_state(0, 5), layer_idx=i, offset=5)
    seen = []
    for i in range(num_layers):
        seen.append(cache.get_seq_length(i))
        cache.update(attn_state=attn_state(5, seq_len), layer_idx=i, offset=seq_len)
    assert seen == [5] * num_layers


def test_overwrite_rules_gla_relies_on():
    cache = Cache()
    S, conv = torch.randn(2, 4, 8, 8), tuple(torch.randn(2, 6, 4) for _ in range(3))
    state = cache.update(recurrent_state=S, conv_state=conv, layer_idx=0, offset=7)
    assert set(state) == {'recurrent_state', 'attn_state', 'conv_state', 'ffn_state'}
    assert cache.update(layer_idx=0, offset=1) is state          # the live dict
    assert state['recurrent_state'] is S and state['conv_state'] is conv
    cache.update(conv_state=(None, None, None), layer_idx=0, offset=None)   # offset None counts as 1
    assert state['conv_state'] == (None, None, None)
    assert cache.get_seq_length(0) == 9
    cache.update(ffn_state=torch.zeros(1), layer_idx=0, offset=0)
    assert torch.equal(state['ffn_state'], torch.zeros(1)) and state['recurrent_state'] is S


def test_iteration_indexing_and_errors():
    cache = Cache()
    cache.update(recurrent_state=torch.ones(1), layer_idx=2)
    assert len(cache) == 3 and list(cache)[:2] == [None, None]
    assert torch.equal(list(cache)[2]['recurrent_state'], torch.ones(1))
    assert cache.to_legacy_cache()[2] is cache[2]
    with pytest.raises(KeyError, match='out of bounds'):
        cache[3]
    with pytest.raises(ValueError, match='attn_state'):
        cache.update(attn_state=torch.zeros(1, 1), layer_idx=0)
    with pytest.raises(NotImplementedError, match='offloading'):
        Cache(offloading=True)
    with pytest.raises(TypeError, match='state dictionaries'):
        Cache.from_legacy_cache({'a': 1})
    assert FLACache is Cache


def test_beam_search_transforms_nested_states():
    @dataclass
    class Extra:
        x: torch.Tensor
        n: int
    cache = Cache()
    S = torch.arange(3.).view(3, 1)
    cache.update(recurrent_state=S, conv_state=(S + 10, S + 20), ffn_state=Extra(S + 30, 5), layer_idx=0)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    s = cache[0]
    assert s['recurrent_state'].flatten().tolist() == [2, 0, 1]
    assert s['conv_state'][1].flatten().tolist() == [22, 20, 21] and isinstance(s['conv_state'], tuple)
    assert s['ffn_state'].x.flatten().tolist() == [32, 30, 31] and s['ffn_state'].n == 5
    cache.batch_select_indices(torch.tensor([0]))
    cache.batch_repeat_interleave(2)
    assert cache[0]['recurrent_state'].flatten().tolist() == [2, 2]
    cache.update(ffn_state=object(), layer_idx=0)
    with pytest.raises(NotImplementedError, match='object'):
        cache.reorder_cache(torch.tensor([0]))


def test_crop_rolls_back_attention_only():
    cache = Cache()
    cache.update(attn_state=attn_state(0, 6), layer_idx=0)
    cache.update(attn_state=attn_state(0, 6), layer_idx=1)
    cache.crop(4)
    assert [cache.get_seq_length(i) for i in range(2)] == [4, 4]
    assert tokens_of(cache[1]['attn_state'])[0] == [0, 1, 2, 3]
    cache.crop(10)                                   # nothing to drop
    assert cache.get_seq_length(0) == 4
    cache.update(recurrent_state=torch.ones(1), layer_idx=1, offset=0)
    with pytest.raises(NotImplementedError, match='rollback'):
        cache.crop(-1)
    assert cache.get_seq_length(0) == 4              # all or nothing: layer 0 was not cropped either
    windowed = Cache()
    windowed.update(attn_state=attn_state(0, 6), layer_idx=0, cache_kwargs={'window_size': 4})
    with pytest.raises(NotImplementedError, match='sliding-window'):
        windowed.crop(2)


def test_offload_and_prefetch_round_trip():
    cache = Cache()
    S = torch.randn(2, 3)
    cache.update(recurrent_state=S, conv_state=(S, None), layer_idx=0)
    layer = cache.layers[0]
    assert layer.device == S.device
    layer.offload()
    layer.prefetch()
    assert torch.equal(cache[0]['recurrent_state'], S) and cache[0]['conv_state'][1] is None


def test_mask_sizes():
    cache = Cache()
    assert cache.get_mask_sizes(3, 0) == (3, 0)
    cache.update(recurrent_state=torch.ones(1), layer_idx=0, offset=5)
    assert cache.get_mask_sizes(3, 0) == (8, 0)
    cache.update(attn_state=attn_state(0, 10), layer_idx=1, cache_kwargs={'window_size': 4})
    assert cache.get_mask_sizes(1, 1) == (4, 7)


def test_layer_helpers():
    class Toy(torch.nn.Module):
        def __init__(self, layer_idx=None):
            super().__init__()
            self.layer_idx = layer_idx
    cache = Cache()
    assert require_cache_layer_idx(Toy(), None) is None and require_cache_layer_idx(Toy(3), cache) == 3
    with pytest.raises(ValueError, match='Toy requires `layer_idx` when `past_key_values` is provided'):
        get_layer_cache(Toy(), cache)
    with pytest.raises(ValueError, match='requires `layer_idx`'):
        update_layer_cache(Toy(), cache, offset=1)
    assert update_layer_cache(Toy(1), cache, recurrent_state=torch.ones(1), offset=2)['recurrent_state'].item() == 1
    assert get_layer_cache(Toy(0), cache) is None and get_layer_cache(Toy(5), cache) is None
    assert get_layer_cache(Toy(1), cache) is cache[1]
    legacy = ({'recurrent_state': 1},)               # a legacy tuple is read the same way
    assert get_layer_cache(Toy(0), legacy) == {'recurrent_state': 1}


def test_is_a_transformers_cache():
    tf = pytest.importorskip('transformers')
    from transformers.cache_utils import Cache as HFCache, CacheLayerMixin
    cache = Cache()
    assert isinstance(cache, HFCache) and isinstance(FLALayer(), CacheLayerMixin), tf.__version__
    cache.update(recurrent_state=torch.ones(2, 1), layer_idx=0, offset=4)
    # the base class's own helpers, as transformers' generation code calls them
    assert cache.is_compileable is False and cache.is_sliding == [False] and cache.is_initialized
    assert cache.get_seq_length() == 4 and cache.get_mask_sizes(1, 0) == (5, 0)
    assert cache.is_croppable is False
    HFCache.reorder_cache(cache, torch.tensor([1, 0]))
    HFCache.batch_repeat_interleave(cache, 2)
    assert cache[0]['recurrent_state'].shape == (4, 1)
    HFCache.reset(cache)
    assert cache[0] is None and cache.get_seq_length() == 0


def test_works_without_transformers():
    code = """
import sys; sys.modules['transformers'] = None
import torch
from myfla_gla import Cache, FLALayer, GatedLinearAttention
c = Cache()
c.update(recurrent_state=torch.ones(2, 1), conv_state=(torch.ones(2, 3, 4),), layer_idx=1, offset=4)
assert len(c) == 2 and c[0] is None and c.get_seq_length(1) == 4 and not c.is_initialized
assert c.is_sliding == [False, False] and c.get_mask_sizes(1, 1) == (5, 0) and not c.is_croppable
c.update(recurrent_state=torch.ones(2, 1), layer_idx=0)
assert c.is_initialized
c.reorder_cache(torch.tensor([1, 0])); c.batch_repeat_interleave(2)
assert c[1]['conv_state'][0].shape == (4, 3, 4)
assert Cache.from_legacy_cache(c.to_legacy_cache(), seen_tokens=2).get_seq_length(1) == 2
c.reset(); assert c[1] is None
layer = GatedLinearAttention(hidden_size=16, num_heads=2, use_short_conv=True, layer_idx=0)
x = torch.randn(1, 5, 16)
cache = Cache()
o1 = layer(x[:, :3], past_key_values=cache, use_cache=True)[0]
o2 = layer(x[:, 3:], past_key_values=cache, use_cache=True)[0]
torch.testing.assert_close(torch.cat([o1, o2], 1), layer(x)[0])
print('ok', [b.__name__ for b in Cache.__mro__])
"""
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout and 'transformers' not in res.stdout
