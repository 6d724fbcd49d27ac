"""Keywords that nothing reads, and `cu_seqlens_cpu` that disagrees with `cu_seqlens`.

FLA's ops and modules take `**kwargs` and ignore what they do not read, so a misspelt keyword changes nothing
without a word (`fused_recurrent_gla(q, k, v, g=g)` runs with no gate). Here every public op and module (every
callable exported at FLA's op and module paths, found by walking the packages, so a new export is covered without
editing this file) rejects a misspelt keyword with a `TypeError` naming it; the layer, which transformers passes
extra keys to, warns once per name.
"""
import importlib
import inspect
import pkgutil
import warnings

import pytest
import torch
from torch import nn

import myfla_gla
from myfla_gla import (GatedLinearAttention, causal_conv1d, chunk_gla, fused_chunk_gla, fused_recurrent_gla,
                       prepare_chunk_indices, prepare_position_ids, random_gla_inputs)

PACKAGES = ('myfla_gla.ops', 'myfla_gla.modules')

# constructor arguments for the exported classes (a new class with required arguments needs an entry)
CTOR = {'hidden_size': 8, 'kernel_size': 2, 'intermediate_size': 16, 'dim': 8, 'in_features': 8, 'out_features': 4}

# callables whose `**kwargs` carry keys through on purpose, with the reason; each is tested elsewhere
PASS_THROUGH = {
    'GatedMLP.forward': "FLA's blocks pass the layer's keys (cu_seqlens, ...) to the MLP too: warns (test_models)",
    'fused_recurrent_gla_cp': 'forwards its keywords to fused_recurrent_gla, which checks them (needs process groups)',
    'GatedLinearAttention.forward': 'transformers passes extra keys to every layer: warns (test below)',
}


def exported():
    "(name, object) of every callable in the `__all__` of every module under `PACKAGES`."
    seen = {}
    for pkg in PACKAGES:
        root = importlib.import_module(pkg)
        for mod_name in [pkg] + [f'{pkg}.{m.name}' for m in pkgutil.walk_packages(root.__path__)]:
            mod = importlib.import_module(mod_name)
            for name in getattr(mod, '__all__', ()):
                obj = getattr(mod, name)
                if callable(obj) and id(obj) not in seen:
                    seen[id(obj)] = (name, obj)
    return sorted(seen.values(), key=lambda x: x[0])


def misspelling(fn) -> str:
    "A near miss of one of `fn`'s keywords: its longest defaulted parameter minus its last letter (or `q` + 'q')."
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ('self', 'ctx')]
    defaulted = [p.name for p in params if p.default is not p.empty and len(p.name) > 1]
    if defaulted:
        return max(defaulted, key=len)[:-1]
    return (params[0].name + params[0].name[-1]) if params else 'keyword'


def call_with(fn, bad: str, bound=None):
    "Call `fn` with placeholders (a 1-element tensor) for its required arguments and the keyword `bad`."
    sig = inspect.signature(fn)
    required = [p for p in sig.parameters.values() if p.default is p.empty and p.name not in ('self', 'ctx')
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    args = [torch.zeros(1)] * len(required)
    return (fn if bound is None else getattr(bound, fn.__name__))(*args, **{bad: 1})


def _cases():
    for name, obj in exported():
        if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
            yield f'{name}.apply', obj.forward, lambda bad, o=obj: o.apply(**{bad: 1})
        elif isinstance(obj, type):
            init = obj.__init__
            yield f'{name}.__init__', init, lambda bad, o=obj: o(**_ctor_args(o), **{bad: 1})
            if issubclass(obj, nn.Module):
                yield f'{name}.forward', obj.forward, lambda bad, o=obj: call_with(o.forward, bad, o(**_ctor_args(o)))
        else:
            yield name, obj, lambda bad, o=obj: call_with(o, bad)


def _ctor_args(cls):
    out = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            assert p.name in CTOR, f'add a value for `{p.name}` of {cls.__name__} to CTOR'
            out[p.name] = CTOR[p.name]
    return out


CASES = list(_cases())


def test_the_walk_finds_the_ops_and_modules():
    "The export walk sees what it must (a broken walk would make the test below vacuous)."
    names = {c[0] for c in CASES}
    for want in ('chunk_gla', 'fused_chunk_gla', 'fused_recurrent_gla', 'naive_recurrent_gla', 'causal_conv1d',
                 'ShortConvolution.__init__', 'ShortConvolution.forward', 'RMSNorm.forward',
                 'FusedRMSNormGated.forward', 'FusedLayerNormGated.forward', 'GatedMLP.__init__'):
        assert want in names, want
    assert set(PASS_THROUGH) - {'GatedLinearAttention.forward'} <= names   # no stale entries


@pytest.mark.parametrize('name,fn,call', [pytest.param(*c, id=c[0]) for c in CASES if c[0] not in PASS_THROUGH])
def test_every_op_and_module_rejects_a_misspelt_keyword(name, fn, call):
    "A near miss of a real keyword: a `TypeError` naming it, before any work (placeholders for the inputs)."
    bad = misspelling(fn)
    with pytest.raises(TypeError) as err:
        call(bad)
    assert f'{bad}' in str(err.value), (name, str(err.value))


def test_the_cases_of_the_report():
    "The keywords that changed nothing: each is a TypeError with the close match."
    q, k, v, g = random_gla_inputs(1, 6, 2, 4)
    h0 = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match='`g`; did you mean `gk` or `gv`'):
        fused_recurrent_gla(q, k, v, g=g)
    with pytest.raises(TypeError, match='`initial_states`; did you mean `initial_state`'):
        fused_chunk_gla(q, k, v, g, initial_states=h0)
    with pytest.raises(TypeError, match='`output_final_states`; did you mean `output_final_state`'):
        fused_chunk_gla(q, k, v, g, output_final_states=True)
    with pytest.raises(TypeError, match='`reverse`'):
        fused_chunk_gla(q, k, v, g, reverse=True)
    with pytest.raises(TypeError, match='`initial_states`'):
        fused_recurrent_gla(q, k, v, g, initial_states=h0)
    with pytest.raises(TypeError, match='`cu_seqlen`; did you mean `cu_seqlens`'):
        fused_recurrent_gla(q, k, v, g, cu_seqlen=torch.tensor([0, 6]))
    with pytest.raises(TypeError, match='`cu_seqlen`'):
        causal_conv1d(q.flatten(2), torch.randn(8, 4), cu_seqlen=torch.tensor([0, 6]))
    # what they do read still works: FLA's head_first=False, cu_seqlens_cpu, the deprecated transpose_state_layout
    cu = torch.tensor([0, 2, 6])
    ref = chunk_gla(q, k, v, g, cu_seqlens=cu)[0]
    torch.testing.assert_close(fused_chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=cu, head_first=False)[0], ref)
    torch.testing.assert_close(fused_recurrent_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=cu)[0], ref)
    with pytest.warns(DeprecationWarning):
        fused_recurrent_gla(q, k, v, g, transpose_state_layout=False)


def test_layer_warns_once_per_unknown_keyword():
    "The layer warns about a key it ignores, once per name; what transformers passes through stays silent."
    layer = GatedLinearAttention(hidden_size=16, num_heads=2)
    x = torch.randn(1, 5, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        for _ in range(3):
            layer(x, cu_seqlen_unknown=1, position_ids=torch.arange(5)[None], cache_position=torch.arange(5))
        layer(x, another_key=2)
    msgs = [str(m.message) for m in w if 'ignores the keyword' in str(m.message)]
    assert msgs == ['GatedLinearAttention.forward() ignores the keyword argument `cu_seqlen_unknown`; '
                    'did you mean `cu_seqlens`?',
                    'GatedLinearAttention.forward() ignores the keyword argument `another_key`'], msgs


def test_generate_passes_no_key_the_layer_warns_about():
    "transformers' `generate` (with a mask, the cache, prefill and decoding) makes the layers warn about nothing."
    from myfla_gla.models.gla import GLAConfig, GLAForCausalLM
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=32)).eval()
    ids = torch.randint(0, 32, (2, 6))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert not [m for m in w if 'ignores the keyword' in str(m.message)], [str(m.message) for m in w]


# --- cu_seqlens_cpu against cu_seqlens ---------------------------------------------------------------------

def _packed():
    q, k, v, g = random_gla_inputs(1, 12, 2, 4)
    return q, k, v, g, torch.tensor([0, 5, 12])


@pytest.mark.parametrize('op', [chunk_gla, fused_chunk_gla, fused_recurrent_gla], ids=lambda op: op.__name__)
def test_cu_seqlens_cpu_must_agree(op):
    "On the CPU the values are compared, and the length always: a stale copy is a ValueError, not wrong boundaries."
    q, k, v, g, cu = _packed()
    ref = op(q, k, v, g, cu_seqlens=cu, output_final_state=True)
    same = op(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=cu.clone(), output_final_state=True)
    for a, b in zip(ref, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for bad in (torch.tensor([0, 7, 12]), torch.tensor([0, 5, 8, 12])):
        with pytest.raises(ValueError, match='cu_seqlens_cpu'):
            op(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=bad)
    with pytest.raises(ValueError, match='`cu_seqlens_cpu` is given without `cu_seqlens`'):   # no packing asked for
        op(q, k, v, g, cu_seqlens_cpu=cu)


def test_cu_seqlens_cpu_in_the_conv_and_the_index_helpers():
    q, _, _, _, cu = _packed()
    x, w = q.flatten(2), torch.randn(8, 3)
    torch.testing.assert_close(causal_conv1d(x, w, cu_seqlens=cu, cu_seqlens_cpu=cu)[0], causal_conv1d(x, w, cu_seqlens=cu)[0])
    with pytest.raises(ValueError, match='cu_seqlens_cpu'):
        causal_conv1d(x, w, cu_seqlens=cu, cu_seqlens_cpu=torch.tensor([0, 6, 12]))
    with pytest.raises(ValueError, match='cu_seqlens_cpu'):
        prepare_position_ids(cu, torch.tensor([0, 6, 12]))
    with pytest.raises(ValueError, match='cu_seqlens_cpu'):
        prepare_chunk_indices(cu, 4, torch.tensor([0, 12]))


def test_cu_seqlens_cpu_on_another_device_is_compared_by_length_only():
    """Where `cu_seqlens` is not on the CPU, reading its values would synchronise the device: only the length is
    compared, and (documented) a disagreeing `cu_seqlens_cpu` sets the boundaries. Shown with the meta device."""
    cu = torch.tensor([0, 5, 12], device='meta')
    assert prepare_position_ids(cu, torch.tensor([0, 6, 12])).device.type == 'meta'   # values not compared
    with pytest.raises(ValueError, match='cu_seqlens_cpu'):
        prepare_position_ids(cu, torch.tensor([0, 12]))


def test_package_exports_are_walked():
    "The ops the package exports at its top level are among the walked ones."
    walked = {id(o) for _, o in exported()}
    for name in ('chunk_gla', 'fused_chunk_gla', 'fused_recurrent_gla', 'naive_recurrent_gla', 'ShortConvolution',
                 'RMSNorm', 'FusedRMSNormGated', 'FusedLayerNormGated'):
        assert id(getattr(myfla_gla, name)) in walked, name
