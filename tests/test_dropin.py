"""An FLA user's script with `fla` replaced by `myfla_gla`, and checkpoint folders as FLA writes them.

The first tests are written as FLA's documentation and tests use FLA: its import lines, a layer, a tiny model
through transformers' Auto classes, saving and loading through them, greedy generation with and without the
cache. Then checkpoint folders: one written by FLA 0.6.0's own classes (built in a subprocess, since importing
FLA registers its own `'gla'` Auto classes; skipped where FLA does not import), one with the keys older FLA
releases wrote, and folders that do not fit, each failing with an error that names the key and the file.
"""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip('transformers')

from helpers import run_with_fla  # noqa: E402

# --- the FLA user's script, `fla` -> `myfla_gla` -------------------------------------------------------------
import myfla_gla  # noqa: E402  (registers the Auto classes, as `import fla` does)
from myfla_gla.layers import GatedLinearAttention  # noqa: E402
from myfla_gla.layers.utils import pad_input, unpad_input  # noqa: E402
from myfla_gla.models import GLAConfig, GLAForCausalLM, GLAModel  # noqa: E402
from myfla_gla.models.utils import Cache  # noqa: E402
from myfla_gla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution  # noqa: E402
from myfla_gla.modules.activations import ACT2FN  # noqa: E402
from myfla_gla.ops.gla import chunk_gla, fused_chunk_gla, fused_recurrent_gla  # noqa: E402
from myfla_gla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from myfla_gla.ops.utils import prepare_chunk_indices, prepare_position_ids  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from myfla_gla.testing import get_err_ratio  # noqa: E402

# torch caches the set of factory functions that `with torch.device(...)` redirects on first use: build it now,
# before conftest's NaN-filling `torch.empty` stand-in is patched in (else `meta` models would allocate)
with torch.device('meta'):
    torch.empty(1)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, use_short_conv=True)


def test_names_are_the_package_own():
    assert GatedLinearAttention is myfla_gla.layers.gla.GatedLinearAttention
    assert chunk_gla is myfla_gla.ops.chunk.chunk_gla and fused_recurrent_gla is myfla_gla.ops.recurrent.fused_recurrent_gla
    assert (GLAConfig, GLAModel, GLAForCausalLM, Cache) == (myfla_gla.GLAConfig, myfla_gla.GLAModel,
                                                            myfla_gla.GLAForCausalLM, myfla_gla.Cache)
    assert ACT2FN['swish'] is myfla_gla.ACT2FN['swish'] and naive_recurrent_gla is myfla_gla.naive_recurrent_gla


def test_index_helpers_take_fla_arguments():
    cu = torch.tensor([0, 5, 5, 12])
    torch.testing.assert_close(prepare_chunk_indices(cu, 4, cu_seqlens_cpu=cu),
                               torch.tensor([[0, 0], [0, 1], [2, 0], [2, 1]]))
    torch.testing.assert_close(prepare_position_ids(cu, cu), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]))


def test_ops_as_fla_calls_them():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 37, 2, 8, 16
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)) / 16
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    ref, ref_ht = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)  # scale K**-0.5
    for op in (chunk_gla, fused_chunk_gla):
        o, ht = op(q, k, v, g, initial_state=h0, output_final_state=True)
        assert get_err_ratio(ref, o) < 1e-12 and get_err_ratio(ref_ht, ht) < 1e-12
    o, ht = fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True)
    assert get_err_ratio(ref, o) < 1e-12 and get_err_ratio(ref_ht, ht) < 1e-12


def test_fla_varlen_reference_per_sequence():
    "FLA's varlen test calls the naive reference per sequence with an `[H, K, V]` initial state: it broadcasts."
    torch.manual_seed(0)
    cu, H, D = [0, 5, 12], 2, 4
    q, k, v = (torch.rand(1, 12, H, D) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.rand(1, 12, H, D))
    h0 = torch.rand(2, H, D, D)
    refs, hts = zip(*(naive_recurrent_gla(q=q[:, s:e], k=k[:, s:e], v=v[:, s:e], gk=g[:, s:e], initial_state=h0[i],
                                          output_final_state=True) for i, (s, e) in enumerate(zip(cu[:-1], cu[1:]))))
    o, ht = fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor(cu))
    torch.testing.assert_close(torch.cat(refs, 1), o)
    torch.testing.assert_close(torch.cat(hts), ht)


class DummyCache(list):
    "FLA's tests/layers/test_layer_cache_layer_idx.py: a duck-typed cache."
    def update(self, **kwargs):
        return kwargs


def test_cache_requires_layer_idx_first():
    "A layer without `layer_idx` given a cache: FLA's ValueError, before anything about the cache's type."
    layer = GatedLinearAttention(hidden_size=16, num_heads=4)
    with pytest.raises(ValueError, match='requires `layer_idx`'):
        layer(hidden_states=torch.randn(1, 2, 16), past_key_values=DummyCache([{}]))


def test_layer_modes_agree():
    torch.manual_seed(0)
    layer = GatedLinearAttention(mode='chunk', hidden_size=32, num_heads=2, use_short_conv=True, layer_idx=0).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)            # > 64 tokens: the chunk path
    o, _, _ = layer(x)
    layer.mode = 'fused_recurrent'
    torch.testing.assert_close(layer(x)[0], o, rtol=1e-10, atol=1e-12)
    norm = RMSNorm(32, eps=1e-6).double()
    torch.testing.assert_close(norm(x), x * x.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt())
    gated = FusedRMSNormGated(32, eps=1e-6).double()
    torch.testing.assert_close(gated(x, o), norm(x) * torch.nn.functional.silu(o))
    assert GatedMLP(64).intermediate_size == 256                  # FLA's rounding of 2/3 * 4 * 64 up to 256
    conv = ShortConvolution(32, 4, activation=None).double()
    torch.testing.assert_close(conv(x)[0][:, :1], x[:, :1] * conv.weight[:, 0, -1])


def _greedy(model, prompt, n):
    "The greedy continuation by hand: the full sequence again at every step (no cache)."
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def test_tiny_model_through_the_auto_classes(tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model('gla', **TINY)
    assert type(config) is GLAConfig
    model = AutoModelForCausalLM.from_config(config).double().eval()
    assert type(model) is GLAForCausalLM and type(AutoModel.from_config(config)) is GLAModel
    model.save_pretrained(tmp_path / 'tiny')
    again = AutoModelForCausalLM.from_pretrained(tmp_path / 'tiny', dtype=torch.float64).eval()
    assert type(again) is GLAForCausalLM
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), name
    prompt = torch.randint(0, TINY['vocab_size'], (2, 5))
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached, uncached = again.generate(prompt, use_cache=True, **kw), again.generate(prompt, use_cache=False, **kw)
        by_hand = _greedy(again, prompt, 7)
    assert torch.equal(cached, uncached) and torch.equal(cached, by_hand)
    base = AutoModel.from_pretrained(tmp_path / 'tiny', dtype=torch.float64)
    assert type(base) is GLAModel
    torch.testing.assert_close(base(prompt).last_hidden_state, again.model(prompt).last_hidden_state)


# --- checkpoint folders ----------------------------------------------------------------------------------------

def _save_tiny(folder, **overrides):
    torch.manual_seed(0)
    GLAForCausalLM(GLAConfig(**{**TINY, **overrides})).save_pretrained(folder)
    return json.loads(Path(folder, 'config.json').read_text())


def test_older_fla_config_keys_load_and_are_kept(tmp_path):
    cfg = _save_tiny(tmp_path)
    older = {k: v for k, v in cfg.items() if k not in ('attnres_block_size', 'use_l2warp', 'dtype')}
    older.update(transformers_version='4.44.0', torch_dtype='float32', architectures=['GLAForCausalLM'],
                 share_conv_kernel=True, fuse_cross_entropy=True, attn_mode='fused_chunk', rms_norm_eps=1e-6)
    (tmp_path / 'config.json').write_text(json.dumps(older))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is GLAForCausalLM
    assert model.config.share_conv_kernel is True and model.config.rms_norm_eps == 1e-6   # unknown keys kept
    assert model.config.attn_mode == 'fused_chunk' and model.config.use_l2warp is False  # missing keys: defaults


def test_folder_without_config(tmp_path):
    _save_tiny(tmp_path)
    (tmp_path / 'config.json').unlink()
    with pytest.raises(OSError, match='config.json'):
        GLAForCausalLM.from_pretrained(tmp_path)
    with pytest.raises((OSError, ValueError), match='config.json'):   # transformers' own error
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    cfg = _save_tiny(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'not_a_model'}))
    with pytest.raises(ValueError, match="not_a_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json'.*`model_type` is 'not_a_model'"):
        GLAForCausalLM.from_pretrained(tmp_path)


def test_config_disagreeing_with_weights_fails_before_allocating(tmp_path):
    cfg = _save_tiny(tmp_path)
    # a model of this config would need about 2.7 TB: the error must come before anything is allocated
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'hidden_size': 2 ** 15, 'vocab_size': 2 ** 22}))
    file = str(tmp_path / 'model.safetensors')
    with pytest.raises(ValueError, match=rf"{file}'.*'model\.embeddings\.weight' has shape \(64, 32\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_and_extra_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    _save_tiny(tmp_path)
    file = tmp_path / 'model.safetensors'
    weights = load_file(file)
    save_file({k: v for k, v in weights.items() if k != 'model.layers.1.attn.gk_proj.0.weight'}, file)
    with pytest.raises(KeyError, match=rf"model.safetensors'.*'model\.layers\.1\.attn\.gk_proj\.0\.weight'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    save_file({**weights, 'model.layers.0.attn.extra': torch.zeros(2)}, file)
    with pytest.raises(KeyError, match=r"model.safetensors'.*'model\.layers\.0\.attn\.extra'"):
        GLAForCausalLM.from_pretrained(tmp_path)


def test_save_onto_a_file_raises(tmp_path):
    (tmp_path / 'taken').write_text('not a folder')
    model = GLAForCausalLM(GLAConfig(**TINY))
    with pytest.raises(FileExistsError, match='taken'):
        model.save_pretrained(tmp_path / 'taken')
    assert (tmp_path / 'taken').read_text() == 'not a folder'


def test_save_is_never_half_written(tmp_path, monkeypatch):
    _save_tiny(tmp_path / 'ckpt')
    (tmp_path / 'ckpt' / 'tokenizer.json').write_text('{}')
    before = {p.name: p.read_bytes() for p in (tmp_path / 'ckpt').iterdir()}
    import transformers.modeling_utils

    def broken(*args, **kwargs):  # the weights fail to write, after config.json was written
        raise OSError('disk full')
    monkeypatch.setattr(transformers.modeling_utils, 'safe_save_file', broken)
    bigger = GLAForCausalLM(GLAConfig(**{**TINY, 'num_hidden_layers': 3}))
    with pytest.raises(OSError, match='disk full'):
        bigger.save_pretrained(tmp_path / 'ckpt')
    assert {p.name: p.read_bytes() for p in (tmp_path / 'ckpt').iterdir()} == before   # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']                      # no temporary folder left
    monkeypatch.undo()
    bigger.save_pretrained(tmp_path / 'ckpt')                                          # a save over it replaces it
    assert json.loads((tmp_path / 'ckpt' / 'config.json').read_text())['num_hidden_layers'] == 3
    assert (tmp_path / 'ckpt' / 'tokenizer.json').read_text() == '{}'                  # other files kept
    assert AutoModelForCausalLM.from_pretrained(tmp_path / 'ckpt').config.num_hidden_layers == 3


FLA_WRITER = '''
    torch.manual_seed(0)
    for tied in (False, True):
        config = GLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, use_short_conv=True,
                           tie_word_embeddings=tied)
        GLAForCausalLM(config).save_pretrained(f'{sys.argv[1]}/tied={tied}')
    from transformers import AutoConfig, AutoModelForCausalLM
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64)
    print(json.dumps({'AutoConfig': type(AutoConfig.for_model('gla')).__module__.split('.')[0],
                      'from_config(ours)': type(AutoModelForCausalLM.from_config(myfla_gla.GLAConfig(**tiny))).__module__,
                      'from_config(FLA)': type(AutoModelForCausalLM.from_config(GLAConfig(**tiny))).__module__}))
'''


def test_checkpoints_written_by_fla(tmp_path):
    from safetensors.torch import load_file
    out = run_with_fla('from fla.models import GLAConfig, GLAForCausalLM', FLA_WRITER, tmp_path)
    # what the porting page says of the Auto classes with both packages imported (FLA last)
    assert json.loads(out.strip().splitlines()[-1]) == {
        'AutoConfig': 'fla', 'from_config(ours)': 'myfla_gla.models.gla', 'from_config(FLA)': 'fla.models.gla.modeling_gla'}
    for tied in (False, True):
        folder = tmp_path / f'tied={tied}'
        stored = load_file(folder / 'model.safetensors')
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is GLAForCausalLM
        ours = model.state_dict()
        assert set(stored) <= set(ours) and set(ours) - set(stored) <= ({'lm_head.weight'} if tied else set())
        for k, v in stored.items():
            assert torch.equal(ours[k], v), k
        assert (model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()) == tied
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 64, (1, 6))).logits).all()


def test_pytorch_bin_checkpoint(tmp_path):
    "Older checkpoints store `pytorch_model.bin`: its names and shapes are read memory-mapped, then it loads."
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(**TINY))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), name
    cfg = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'num_heads': 4, 'expand_k': 1.0}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin'.*'model\.layers\.0\.attn\.q_proj\.weight' has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
