"""Shared test set-up.

As in FLA's own suite, while a test runs `torch.empty`, `torch.empty_like` and `Tensor.new_empty`, when called
from myfla_gla's code, return NaN-filled float tensors: an output element the code never writes then shows
up as NaN instead of passing by luck. Tests marked `compile` opt out (the tracer would see the wrapper).
"""
import sys

import pytest
import torch

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


def pytest_configure(config):
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
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
