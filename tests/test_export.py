"""GLA outside eager mode: `loop_free_gla` (the op exported graphs use), torch.export of the ops, the layer and the
model with a dynamic batch and length, `DecodeStep` against `generate`, and the exported step in ONNX Runtime,
AOTInductor and ExecuTorch. One tiny model; each exported artifact is made once per module."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from myfla_gla.cache import Cache
from myfla_gla.checks import InputError
from myfla_gla.export import (DecodeStep, ExecuTorchStep, OnnxStep, export_step, greedy_decode, load_aoti, to_aoti,
                              to_executorch, to_onnx)
from myfla_gla.layers.gla import GatedLinearAttention
from myfla_gla.models.gla import GLAConfig, GLAForCausalLM
from myfla_gla import get_err_ratio
from myfla_gla.ops.chunk import chunk_gla, fused_chunk_gla, loop_free_gla
from myfla_gla.ops.recurrent import fused_recurrent_gla, reference_recurrent_gla
from myfla_gla.testing import random_gla_inputs

LENGTHS = (1, 37, 64, 65, 300, 4096)
PROMPT, NEW = 50, 20


def dims():
    b, t = torch.export.Dim('b', max=64), torch.export.Dim('t', max=8192)
    return b, t


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    # large initial weights: logits far apart, so greedy tokens are not decided by rounding
    cfg = GLAConfig(vocab_size=64, hidden_size=32, num_heads=2, num_hidden_layers=1, use_short_conv=True,
                    conv_size=4, intermediate_size=64, initializer_range=0.2, eos_token_id=None,
                    gate_logit_normalizer=1)
    return GLAForCausalLM(cfg).eval()


@pytest.fixture(scope='module')
def prompt():
    return torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def reference(model, prompt):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0)


@pytest.fixture(scope='module')
def program(model):
    return export_step(model, one_token_branch=True)   # both branches: one token, and any length


@pytest.fixture(scope='module')
def plain_program(model):
    "The step without the one-token branch (no `torch.cond`), as AOTInductor and ExecuTorch take it: exported once."
    return export_step(model)


@pytest.mark.parametrize('T', LENGTHS[:-1])
@pytest.mark.parametrize('normalizer', [16, 0.1])
def test_loop_free_gla_matches_the_recurrence(T, normalizer):
    q, k, v, g = random_gla_inputs(2, T, 2, 8, 4, gate_logit_normalizer=normalizer, dtype=torch.float64)
    h0 = torch.randn(2, 2, 8, 4, dtype=torch.float64)
    o, ht = loop_free_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    ro, rt = reference_recurrent_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, ro, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ht, rt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('normalizer', [1., 0.1, 0.01, 0.001])
def test_loop_free_gla_keeps_float32_digits_under_strong_decays(normalizer):
    "In float32 as eager's ops: the output and the final state within float32 rounding of the float64 recurrence."
    q, k, v, g = random_gla_inputs(3, 300, 2, 16, 8, gate_logit_normalizer=normalizer)
    h0 = torch.randn(3, 2, 16, 8)
    o, ht = loop_free_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    ro, rt = reference_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert get_err_ratio(ro, o) < 1e-6 and get_err_ratio(rt, ht) < 1e-6, (get_err_ratio(ro, o), get_err_ratio(rt, ht))


def test_ops_and_layer_modes_dispatch_to_loop_free_gla_while_exporting(monkeypatch):
    "Every op (so the layer in every mode) runs `loop_free_gla` while exporting; here in eager, the switch forced on."
    q, k, v, g = random_gla_inputs(2, 70, 2, 8, 4, gate_logit_normalizer=0.1)
    h0 = torch.randn(2, 2, 8, 4)
    want = loop_free_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    layer = GatedLinearAttention(hidden_size=16, num_heads=2, use_short_conv=True, gate_logit_normalizer=0.1).eval()
    x = torch.randn(2, 70, 16)
    with torch.no_grad():
        eager = layer(x)[0]
    monkeypatch.setattr(torch.compiler, '_is_exporting_flag', True)   # what torch.export sets (utils._exporting)
    for op in (chunk_gla, fused_chunk_gla, fused_recurrent_gla):
        for got, ref in zip(op(q, k, v, g, initial_state=h0, output_final_state=True), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for mode in ('chunk', 'fused_chunk', 'fused_recurrent'):
        layer.mode = mode
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], eager, rtol=1e-5, atol=1e-6)


def test_layer_exports_for_training_and_inference():
    "Exported with gradients on (parameters require grad): eager's gradients, and eager's outputs at every length."
    layer = GatedLinearAttention(hidden_size=16, num_heads=2, use_short_conv=True, gate_logit_normalizer=0.1)
    b, t = dims()
    module = torch.export.export(layer, (torch.randn(2, 100, 16),), dynamic_shapes=({0: b, 1: t},)).module()
    for T in (1, 65):
        x = torch.randn(3, T, 16, requires_grad=True)
        layer(x)[0].square().sum().backward()
        want_x, want_w, x.grad = x.grad, layer.q_proj.weight.grad, None
        layer.zero_grad()
        module(x)[0].square().sum().backward()
        torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-5 * want_x.abs().max().item())
        got_w = dict(module.named_parameters())['q_proj.weight'].grad
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5 * want_w.abs().max().item())
        module.zero_grad()
    with torch.no_grad():
        for T in LENGTHS:
            x = torch.randn(3, T, 16)
            want = layer(x)[0]
            torch.testing.assert_close(module(x)[0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_model_forward_exports(model):
    b, t = dims()
    with torch.inference_mode():
        ep = torch.export.export(model, (torch.zeros(2, 100, dtype=torch.long),), dynamic_shapes=({0: b, 1: t},))
        for T in (1, 65, 300):
            ids = torch.randint(0, 64, (3, T))
            want = model(ids, use_cache=False).logits
            torch.testing.assert_close(ep.module()(ids).logits, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_decode_step_equals_generate(model, prompt, reference):
    step = DecodeStep(model)
    assert (reference != 0).any()
    torch.testing.assert_close(greedy_decode(step, prompt, step.initial_states(2), NEW), reference, rtol=0, atol=0)
    # prefill in pieces = prefill at once: the states carry everything
    s = step.initial_states(2)
    logits_a, *_ = step(prompt, *s)
    _, *s = step(prompt[:, :30], *s)
    logits_b, *_ = step(prompt[:, 30:], *s)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)


def test_decode_step_reads_the_cache_without_a_deprecation_warning(model, prompt, monkeypatch):
    "transformers 5 renamed the outputs' `past_key_values` to `cache` and warns when the old name is read."
    generic = pytest.importorskip('transformers.utils.generic')
    said = []
    monkeypatch.setattr(generic.logger, 'warning_once', lambda msg, *a, **k: said.append(msg))
    step = DecodeStep(model)
    step(prompt, *step.initial_states(2))
    assert not said, said


def test_decode_step_checks_its_states(model, prompt):
    step = DecodeStep(model)
    states = list(step.initial_states(2))
    with pytest.raises(InputError, match='takes 4 states'):
        step(prompt, *states[:-1])
    with pytest.raises(InputError, match='layer0_conv_k.*must be \\[2, 16, 4\\]'):
        step(prompt, states[0], states[1][:, :, :3], *states[2:])
    with pytest.raises(TypeError, match='layer0_recurrent.*float32'):
        step(prompt, *states[:-1], states[-1].double())
    assert [s.shape for s in states] == [(2, 16, 4), (2, 16, 4), (2, 32, 4), (2, 2, 16, 8)]


def test_exported_step_equals_generate_and_eager(model, program, prompt, reference):
    step = DecodeStep(model)
    torch.testing.assert_close(greedy_decode(program.module(), prompt, step.initial_states(2), NEW), reference,
                               rtol=0, atol=0)
    for T in LENGTHS:
        ids, states = torch.randint(0, 64, (3, T)), [torch.randn_like(s) for s in step.initial_states(3)]
        got, want = program.module()(ids, *states), step(ids, *states)
        for name, a, b in zip(['logits', *step.state_names], got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=lambda m: f'{name}: {m}')


def test_export_limits_below_the_example_size(model):
    "A graph for short inputs only (max_length below the usual example of 130 tokens) and bad limits named."
    program, step = export_step(model, max_batch=3, max_length=100), DecodeStep(model)
    ids, states = torch.randint(0, 64, (3, 90)), [torch.randn_like(s) for s in step.initial_states(3)]
    for a, b in zip(program.module()(ids, *states), step(ids, *states)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with pytest.raises(InputError, match='`max_batch` must be at least 1'):
        export_step(model, max_batch=0)


@pytest.mark.parametrize('what', ['attention_mask', 'cu_seqlens', 'past_key_values', 'use_cache'])
def test_exporting_what_a_graph_cannot_carry_says_so(model, what):
    ids = torch.zeros(2, 8, dtype=torch.long)
    kwargs = {'attention_mask': {'attention_mask': torch.ones(2, 8, dtype=torch.long)},
              'cu_seqlens': {'cu_seqlens': torch.tensor([0, 8])},
              'past_key_values': {'past_key_values': Cache(), 'use_cache': True},
              'use_cache': {'use_cache': True}}[what]
    if what == 'cu_seqlens':
        ids = ids[:1]

    class Call(torch.nn.Module):   # what reaches the model while tracing (a Cache can't even be a graph input)
        def forward(self, ids):
            return model(ids, **kwargs)
    with pytest.raises(InputError, match=f'`{what}.*cannot be exported'):
        torch.export.export(Call(), (ids,))
    with pytest.raises(ValueError, match='Cache'):   # torch's own error for a Cache as an input
        torch.export.export(model, (ids,), {'past_key_values': Cache(), 'use_cache': True})


@pytest.fixture(scope='module')
def onnx_path(model, program, tmp_path_factory):
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install myfla_gla[export])')
    return to_onnx(model, tmp_path_factory.mktemp('onnx') / 'gla.onnx', program=program)


def test_onnx_runtime_equals_generate(model, onnx_path, prompt, reference):
    step = OnnxStep(onnx_path)
    assert step.inputs == ['input_ids', *DecodeStep(model).state_names]
    tokens = greedy_decode(step, prompt.numpy(), step.initial_states(2), NEW)
    assert (tokens == reference.numpy()).all()
    logits = step(prompt.numpy(), *step.initial_states(2))[0]
    with torch.no_grad():
        want = model(prompt).logits[:, -1]
    torch.testing.assert_close(torch.from_numpy(logits), want, rtol=0, atol=1e-4)


def test_aoti_package_equals_generate(model, program, plain_program, prompt, reference, tmp_path):
    with pytest.raises(InputError, match='torch.cond'):   # computed wrongly by AOTInductor: refused
        to_aoti(model, tmp_path / 'gla.pt2', program=program)
    step = load_aoti(to_aoti(model, tmp_path / 'gla.pt2', program=plain_program))   # C++ compilation: 20 s to minutes
    states = DecodeStep(model).initial_states(2)
    torch.testing.assert_close(greedy_decode(step, prompt, states, NEW), reference, rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec('executorch') is None, reason='executorch is not installed')
def test_executorch_equals_generate(model, plain_program, prompt, reference, tmp_path):
    step = ExecuTorchStep(to_executorch(model, tmp_path / 'gla.pte', program=plain_program))
    states = DecodeStep(model).initial_states(2)
    torch.testing.assert_close(greedy_decode(step, prompt, states, NEW), reference, rtol=0, atol=0)
