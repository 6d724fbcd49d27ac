"""Generation with a cache the caller keeps (nbs/10_models.ipynb): prompt caching and multi-turn chat through
transformers' `generate` give the tokens of a generation from scratch; sampling settings and `logits_to_keep`
that cannot work raise, as transformers' own models do."""
import copy
import functools

import pytest
import torch

from myfla_gla import Cache, GLAConfig, GLAForCausalLM
from myfla_gla.models.gla import TRANSFORMERS_AVAILABLE, simple_generate

needs_transformers = pytest.mark.skipif(not TRANSFORMERS_AVAILABLE, reason='transformers not installed')
V = 64


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


@pytest.fixture(scope='module')
def model():
    "float64, so that greedy tokens are the same whichever way the prompt reaches the state."
    torch.manual_seed(0)
    config = GLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=V, use_short_conv=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=0, initializer_range=0.2)
    return GLAForCausalLM(config).double().eval()


def test_the_model_remembers(model):
    "The weights are large enough that the tokens depend on more than the last one: the checks below can fail."
    ids, _ = _prompt(padded=False)
    assert not torch.equal(simple_generate(model, ids, max_new_tokens=4)[:, -4:],
                           simple_generate(model, ids[:, -1:], max_new_tokens=4)[:, -4:])


def _prompt(B=3, T=9, padded=True):
    "Tokens 1..V-1 (0 pads), left-padded rows of lengths T, T-3, T-5 (or no mask)."
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(1))
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    for row, start in enumerate((0, 3, 5)[:B]):
        mask[row, :start], ids[row, :start] = 0, 0
    return ids, mask


def _prefill(model, ids, mask, n=1):
    "A cache of every token but the last `n`, as a caller builds it for prompt caching."
    cache = Cache()
    with torch.no_grad():
        model(ids[:, :-n], attention_mask=None if mask is None else mask[:, :-n], past_key_values=cache, use_cache=True)
    return cache


def _grow(mask, n):
    return None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], n)], 1)


KW = dict(do_sample=False, pad_token_id=0)


@needs_transformers
@pytest.mark.filterwarnings('ignore:`past_key_values` is deprecated:FutureWarning')   # transformers' older name
@pytest.mark.parametrize('padded', [False, True])
@pytest.mark.parametrize('name', ['past_key_values', 'cache'])
def test_generate_continues_a_prefilled_cache(model, padded, name):
    ids, mask = _prompt(padded=padded)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, **KW)
    cache = _prefill(model, ids, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **{name: cache}, **KW)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + 5   # the caller's cache, advanced (the last token is not fed)


@needs_transformers
@pytest.mark.filterwarnings('ignore:`past_key_values` is deprecated:FutureWarning')
@pytest.mark.parametrize('padded', [False, True])
def test_generate_second_turn_with_the_returned_cache(model, padded):
    "Turn 1 returns its cache; turn 2 goes on from it, with and without new (user) tokens in between."
    ids, mask = _prompt(padded=padded)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, **KW)
    seq, cache = first.sequences, first.past_key_values
    assert isinstance(cache, Cache) and cache.get_seq_length() == seq.shape[1] - 1
    # more tokens of the same answer: the tokens of one longer generation
    cache_copy = copy.deepcopy(cache)
    out = model.generate(seq, attention_mask=_grow(mask, 3), past_key_values=cache, max_new_tokens=4, **KW)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=7, **KW))
    # a user turn after the answer: the tokens of the whole conversation generated from scratch
    user = torch.randint(1, V, (ids.shape[0], 4), generator=torch.Generator().manual_seed(2))
    chat = torch.cat([seq, user], 1)
    out = model.generate(chat, attention_mask=_grow(mask, 7), cache=cache_copy, max_new_tokens=5, **KW)
    assert torch.equal(out, model.generate(chat, attention_mask=_grow(mask, 7), max_new_tokens=5, **KW))


@needs_transformers
def test_generate_with_only_the_new_tokens_and_the_whole_mask(model):
    "transformers' other form: `input_ids` only the tokens the cache has not seen, the mask of the whole sequence."
    ids, mask = _prompt()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, **KW)
    out = model.generate(ids[:, -3:], attention_mask=mask, cache=_prefill(model, ids, mask, 3), max_new_tokens=5, **KW)
    assert torch.equal(out[:, 3:], ref[:, ids.shape[1]:])


@needs_transformers
def test_generate_from_embeddings_with_a_prefilled_cache(model):
    ids, _ = _prompt(padded=False)
    embeds = model.get_input_embeddings()(ids)
    ref = model.generate(inputs_embeds=embeds, max_new_tokens=5, **KW)
    cache = _prefill(model, ids, None)
    out = model.generate(inputs_embeds=embeds, cache=cache, max_new_tokens=5, **KW)
    assert torch.equal(out, ref) and torch.equal(ref, model.generate(ids, max_new_tokens=5, **KW)[:, ids.shape[1]:])


@needs_transformers
def test_generate_refuses_a_cache_that_has_seen_every_token(model):
    "The last token's logits are not in the cache: a cache of the whole prompt (or more) cannot continue it."
    ids, _ = _prompt(padded=False)
    for seen in (ids.shape[1], ids.shape[1] + 2):
        cache = Cache()
        with torch.no_grad():
            model(torch.cat([ids, ids], 1)[:, :seen], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=f'The cache has seen {seen} tokens'):
            model.generate(ids, cache=cache, max_new_tokens=2, **KW)


@pytest.mark.parametrize('padded', [False, True])
def test_simple_generate_continues_a_cache_over_two_turns(model, padded):
    "The loop without transformers: a prefilled cache, then its second turn with user tokens, as from scratch."
    ids, mask = _prompt(padded=padded)
    cache = _prefill(model, ids, mask)
    first = simple_generate(model, ids, attention_mask=mask, max_new_tokens=3, past_key_values=cache)
    assert torch.equal(first, simple_generate(model, ids, attention_mask=mask, max_new_tokens=3))
    assert cache.get_seq_length() == first.shape[1] - 1
    chat = torch.cat([first, torch.randint(1, V, (ids.shape[0], 4), generator=torch.Generator().manual_seed(2))], 1)
    second = simple_generate(model, chat, attention_mask=_grow(mask, 7), max_new_tokens=4, cache=cache)
    assert torch.equal(second, simple_generate(model, chat, attention_mask=_grow(mask, 7), max_new_tokens=4))
    with pytest.raises(ValueError, match=f'it has seen {chat.shape[1] + 3} of {chat.shape[1]}'):
        simple_generate(model, chat, max_new_tokens=1, cache=cache)


def test_simple_generate_refuses_keywords_it_does_not_use(model):
    ids, _ = _prompt(padded=False)
    with pytest.raises(TypeError, match=r'`max_new_token`; did you mean `max_new_tokens`\?'):
        simple_generate(model, ids, max_new_token=3)
    with pytest.raises(TypeError, match="unexpected keyword argument `num_beams`$"):
        simple_generate(model, ids, num_beams=2)


# ---------------------------------------------------------------------------------------------------------------
# sampling settings and `logits_to_keep`

@pytest.mark.parametrize('kw, match', [(dict(max_new_tokens=0), '`max_new_tokens` must be at least 1'),
                                       (dict(max_new_tokens=-2), '`max_new_tokens` must be at least 1'),
                                       (dict(max_length=9), r'`max_length` \(9\) must exceed')])
def test_generation_lengths_that_generate_nothing_raise(model, kw, match):
    "As transformers' `generate` (a prompt of 9 tokens)."
    ids, _ = _prompt(padded=False)
    with pytest.raises(ValueError, match=match):
        simple_generate(model, ids, **kw)
    if TRANSFORMERS_AVAILABLE:
        with pytest.raises(ValueError, match='`max_new_tokens` must be greater than 0|`max_length` is set to'):
            model.generate(ids, **kw)


BAD_SAMPLING = [(dict(temperature=0.), ValueError, r'`temperature` \(=0.0\).*`do_sample=False`'),
                (dict(temperature=-1.), ValueError, r'`temperature` \(=-1.0\)'),
                (dict(temperature=float('nan')), ValueError, '`temperature`'),
                (dict(top_k=-1), ValueError, '`top_k`'),
                (dict(top_p=-0.5), ValueError, '`top_p`')]


@pytest.mark.parametrize('kw, error, match', BAD_SAMPLING)
def test_simple_generate_refuses_sampling_settings_that_cannot_work(model, kw, error, match):
    ids, _ = _prompt(padded=False)
    with pytest.raises(error, match=match):
        simple_generate(model, ids, max_new_tokens=2, do_sample=True, **kw)
    # greedy decoding ignores the sampling settings, as transformers' does
    assert torch.equal(simple_generate(model, ids, max_new_tokens=2, **kw), simple_generate(model, ids, max_new_tokens=2))


@needs_transformers
@pytest.mark.parametrize('kw, error, match', BAD_SAMPLING)
def test_transformers_generate_refuses_the_same_settings(model, kw, error, match):
    "What simple_generate refuses, transformers' generate refuses too (its logits warpers' ValueErrors)."
    ids, _ = _prompt(padded=False)
    with pytest.raises(error, match=match.split(r' \(')[0]):
        model.generate(ids, max_new_tokens=2, do_sample=True, **kw)


def test_simple_generate_sampling_limits(model):
    "`top_k=0` and `top_p>=1` filter nothing (transformers' meaning); `top_p=0` keeps only the most likely token."
    ids, _ = _prompt(padded=False)
    greedy = simple_generate(model, ids, max_new_tokens=4)
    sample = lambda **kw: simple_generate(model, ids, max_new_tokens=4, do_sample=True,
                                          generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(sample(top_p=0.), greedy) and torch.equal(sample(top_k=1), greedy)
    assert torch.equal(sample(top_k=0, top_p=1.5), sample())


def test_logits_to_keep(model):
    ids, _ = _prompt(padded=False)
    with torch.no_grad():
        full = model(ids).logits
        # float64, to rounding: the head's product over fewer rows may take another BLAS kernel
        same = functools.partial(torch.testing.assert_close, rtol=1e-12, atol=1e-12)
        same(model(ids, logits_to_keep=3).logits, full[:, -3:])
        same(model(ids, logits_to_keep=0).logits, full)
        same(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])
        with pytest.raises(ValueError, match='`logits_to_keep` must be at least 0, got -3'):
            model(ids, logits_to_keep=-3)
        with pytest.raises(TypeError, match='`logits_to_keep` must be an integer'):
            model(ids, logits_to_keep=True)
        with pytest.raises(TypeError, match='`logits_to_keep` must be an integer, got 2.5'):
            model(ids, logits_to_keep=2.5)
        with pytest.raises(TypeError, match='1-d integers'):
            model(ids, logits_to_keep=torch.tensor([0.5]))
