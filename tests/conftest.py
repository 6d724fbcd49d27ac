"""Shared test set-up.

As in FLA's own suite, while a test runs `torch.empty`, `torch.empty_like` and `Tensor.new_empty`, when called
from myfla_gla's code, return NaN-filled float tensors: an output element the code never writes then shows
up as NaN instead of passing by luck. Tests marked `compile` opt out (the tracer would see the wrapper).
"""
import sys

import pytest
import torch
import torch._inductor.config

from helpers import threads

_real = {'empty': torch.empty, 'empty_like': torch.empty_like, 'new_empty': torch.Tensor.new_empty}


def _from_package(depth=2):
    return sys._getframe(depth).f_globals.get('__name__', '').startswith('myfla_gla')


def _poison(t):
    if t.is_floating_point() or t.is_complex():
        t.fill_(float('nan'))
    return t


def _nan_empty(*args, **kwargs):
    t = _real['empty'](*args, **kwargs)
    return _poison(t) if _from_package() else t


def _nan_empty_like(*args, **kwargs):
    t = _real['empty_like'](*args, **kwargs)
    return _poison(t) if _from_package() else t


def _nan_new_empty(self, *args, **kwargs):
    t = _real['new_empty'](self, *args, **kwargs)
    return _poison(t) if _from_package() else t


# The CPU suite's slowest files, slowest first (worker-seconds with two workers on two cores: Inductor, AOTInductor
# and ExecuTorch compilation, the docs build and browser, processes that import the package)
SLOW_FILES = ['test_export.py', 'test_chunk.py', 'test_docs.py', 'test_bench.py', 'test_cp.py', 'test_hgrn2.py',
              'test_attention.py', 'test_recurrent.py']


def pytest_collection_modifyitems(config, items):
    """The slow files first, the rest in their order: `pytest -n 2 --dist loadfile` hands files out in this order
    (see `pytest_configure`), so that no worker is left with a long file at the end while the other idles."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's tests stay together


def pytest_configure(config):
    if not torch.cuda.is_available():
        # pytest-xdist's loadfile hands files out in the collection order, not by their number of tests (its default)
        if getattr(config.option, 'loadscopereorder', False):
            config.option.loadscopereorder = False
        # Inductor compiles its C++ kernels in this process instead of a pool of worker processes: the pool's start-up
        # (each worker imports torch) costs some 10 s of CPU per compiling test, and with pytest-xdist's workers on
        # every core it brings no parallelism (the GPU suite keeps the pool for its Triton kernels)
        torch._inductor.config.compile_threads = 1
    config.addinivalue_line('markers', 'compile: runs torch.compile (slow on CPU; no NaN-filled empty tensors)')
    config.addinivalue_line('markers', 'cuda: needs a CUDA device')


@pytest.fixture(autouse=True)
def nan_filled_empty(request, monkeypatch):
    if request.node.get_closest_marker('compile') is None:
        monkeypatch.setattr(torch, 'empty', _nan_empty)
        monkeypatch.setattr(torch, 'empty_like', _nan_empty_like)
        monkeypatch.setattr(torch.Tensor, 'new_empty', _nan_new_empty)
    yield


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='module')
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures('one_thread')`): one thread is fastest,
    and immune to the spin-waits of oversubscribed cores."""
    with threads(1):
        yield
