"""Every public name that FLA 0.6.0 and myfla_gla share takes the same parameters.

For each FLA import path that `myfla_gla` provides (`fla.X` -> `myfla_gla.X`), every name both modules have is
compared with `inspect.signature`: FLA's parameters must open ours in the same order, with the same names,
kinds (positional, keyword-only, ...) and defaults. Ours may add parameters after FLA's, with defaults. For a
class, `__init__` and every public method FLA's own classes define are compared. Where FLA's callable takes
only `*args, **kwargs` (an `autograd.Function.apply`, a removed op's stub) there is nothing to compare.

Importing FLA registers its own `'gla'` model type with transformers' Auto classes, so the comparison runs in a
subprocess and leaves the other tests' Auto mappings alone. It is skipped, with the reason, where FLA 0.6.0 does
not import (it imports on a CPU with its Triton wheel installed).
"""
import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

# FLA's paths compared: those `myfla_gla` re-exports (nbs/98_porting.ipynb), its modules of FLA's names, and utils
PATHS = ['', 'layers', 'layers.gla', 'layers.attn', 'layers.utils', 'ops', 'ops.gla', 'ops.gla.chunk', 'ops.gla.fused_chunk',
         'ops.gla.fused_recurrent', 'ops.gla.naive', 'ops.utils', 'ops.utils.index', 'modules', 'modules.activations',
         'modules.causal_conv1d', 'modules.convolution', 'modules.norm', 'modules.layernorm', 'modules.fused_norm_gate',
         'modules.mlp', 'modules.l2warp', 'modules.rotary', 'models', 'models.gla', 'models.utils',
         'layers.hgrn2', 'models.hgrn2',
         'utils']  # fla.utils: the test helpers FLA's test files call by keyword (assert_close, get_err_ratio, ...)


# Accepted gaps, each in the differences table (nbs/99_differences.ipynb): the parameter reaches `**kwargs`
ACCEPTED: set[tuple[str, str]] = set()


def _same_default(a, b) -> bool:
    try:
        return bool(a == b) if type(a) is type(b) else repr(a) == repr(b)
    except Exception:
        return repr(a) == repr(b)


def compare(fla_fn, our_fn) -> str | None:
    "Why `our_fn` does not accept FLA's call patterns of `fla_fn` (None when it does)."
    try:
        theirs, ours = inspect.signature(fla_fn).parameters, inspect.signature(our_fn).parameters
    except (TypeError, ValueError):
        return None
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named_t = [p for p in theirs.values() if p.kind not in var]
    named_o = [p for p in ours.values() if p.kind not in var]
    if not named_t:  # FLA's `*args, **kwargs`: nothing to compare
        return None
    for i, t in enumerate(named_t):
        if i >= len(named_o):
            return f'missing parameter {t.name!r} ({t.kind.name}, default {t.default!r})'
        o = named_o[i]
        if (o.name, o.kind) != (t.name, t.kind):
            return f'parameter {i}: FLA {t.name!r} ({t.kind.name}), ours {o.name!r} ({o.kind.name})'
        if not _same_default(o.default, t.default):
            return f'parameter {t.name!r}: FLA default {t.default!r}, ours {o.default!r}'
    for o in named_o[len(named_t):]:
        if o.default is inspect.Parameter.empty:
            return f'extra parameter {o.name!r} has no default'
    for kind in var:
        if any(p.kind == kind for p in theirs.values()) and not any(p.kind == kind for p in ours.values()):
            return f'FLA takes {kind.name}, ours does not'
    return None


def _fla_methods(cls):
    "Public methods that FLA's own classes define (not those inherited from torch or transformers)."
    names = set()
    for base in cls.__mro__:
        if base.__module__.startswith('fla.'):
            names |= {n for n, v in vars(base).items() if not n.startswith('_') and callable(v)}
    return sorted(names | {'__init__'})


def mismatches() -> tuple[list, int]:
    "`([(name, reason), ...], number of callables compared)` over every name FLA and myfla_gla share."
    found, count, seen = [], 0, set()
    for path in PATHS:
        theirs = importlib.import_module('fla' + ('.' + path if path else ''))
        ours = importlib.import_module('myfla_gla' + ('.' + path if path else ''))
        for name, fla_obj in vars(theirs).items():
            if name.startswith('_') or not hasattr(ours, name) or not callable(fla_obj):
                continue
            our_obj = getattr(ours, name)
            if (id(fla_obj), id(our_obj)) in seen:
                continue
            seen.add((id(fla_obj), id(our_obj)))
            pairs = [(name, fla_obj, our_obj)]
            if inspect.isclass(fla_obj):
                pairs = [(f'{name}.{m}', getattr(fla_obj, m), getattr(our_obj, m)) for m in _fla_methods(fla_obj)
                         if hasattr(our_obj, m)]
            for label, a, b in pairs:
                count += 1
                why = compare(a, b)
                where = f"{'fla.' + path if path else 'fla'}.{label}"
                if why and any(where == w and f'missing parameter {p!r}' in why for w, p in ACCEPTED) \
                        and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(b).parameters.values()):
                    continue
                if why:
                    found.append((where, why))
    return found, count


def test_compare_rules():
    "The rules themselves, on small functions (this part needs no FLA)."
    def fla(q, k, scale=None, *, cu_seqlens=None, **kwargs): ...
    def same(q, k, scale=None, *, cu_seqlens=None, extra=1, **kwargs): ...
    def renamed(q, key, scale=None, *, cu_seqlens=None, **kwargs): ...
    def default(q, k, scale=1.0, *, cu_seqlens=None, **kwargs): ...
    def short(q, k, scale=None, **kwargs): ...
    def no_kwargs(q, k, scale=None, *, cu_seqlens=None): ...
    def extra_required(q, k, scale=None, *, cu_seqlens=None, extra, **kwargs): ...
    assert compare(fla, same) is None
    assert 'key' in compare(fla, renamed)
    assert 'default' in compare(fla, default)
    assert "missing parameter 'cu_seqlens'" in compare(fla, short)
    assert 'VAR_KEYWORD' in compare(fla, no_kwargs)
    assert "'extra' has no default" in compare(fla, extra_required)


def test_signatures_match_fla():
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if 'skip' in result:
        pytest.skip(result['skip'])
    assert result['compared'] > 50, result
    assert result['mismatches'] == [], '\n'.join(f'{n}: {w}' for n, w in result['mismatches'])


if __name__ == '__main__':
    try:
        import fla
        if fla.__version__ != '0.6.0':
            raise ImportError(f'FLA {fla.__version__} is installed, these checks are for 0.6.0')
        importlib.import_module('fla.layers')
        importlib.import_module('fla.models')
    except Exception as e:
        print(json.dumps({'skip': f'FLA 0.6.0 does not import here ({type(e).__name__}: {e})'}))
        sys.exit(0)
    found, count = mismatches()
    print(json.dumps({'compared': count, 'mismatches': found}))
