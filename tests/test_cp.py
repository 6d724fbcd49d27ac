"""Context parallelism (nbs/12_cp.ipynb): every rank's output and gradients against the single-process result,
sliced, in 2 and 4 gloo processes on CPU. Each spawned run checks many cases (a spawn costs seconds); a hung
collective becomes an error after the process group's timeout."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from myfla_gla import (Attention, GatedLinearAttention, GLAConfig, GLAForCausalLM, ShortConvolution, causal_conv1d,
                       chunk_gla, fused_chunk_gla, fused_recurrent_gla)
from helpers import cp_layer_errors
from myfla_gla.ops.cp import build_cp_context
from myfla_gla.testing import cp_check_op, run_on_ranks
from myfla_gla.testing import DEFAULT_RATIO, get_err_ratio
from test_hgrn2 import cp_case as hgrn2_case

TIMEOUT = 90


def _errors(fn):
    "The message of the exception `fn()` raises (None if it returns)."
    try:
        fn()
    except (ValueError, TypeError, NotImplementedError) as e:
        return f'{type(e).__name__}: {e}'
    return None


def _conv_case(rank, world, cu, width, dtype):
    "ShortConvolution with `cp_context` against the whole batch: output, grads of x and the weight."
    T, D = cu[-1], 6
    torch.manual_seed(1)
    conv = ShortConvolution(D, width, bias=True).to(torch.float64)
    x = torch.randn(1, T, D, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(1, T, D, dtype=torch.float64)
    y, _ = conv(x, cu_seqlens=torch.tensor(cu))
    y.backward(dy)
    ref_dw = conv.weight.grad.clone()
    conv.zero_grad()
    P = T // world
    sl = slice(rank * P, (rank + 1) * P)
    xl = x.detach()[:, sl].to(dtype).requires_grad_()
    conv_l = conv.to(dtype)
    yl, _ = conv_l(xl, cp_context=build_cp_context(torch.tensor(cu), None, conv1d_kernel_size=width))
    yl.backward(dy[:, sl].to(dtype))
    dw = conv_l.weight.grad.double()
    dist.all_reduce(dw)
    return {'y': get_err_ratio(y[:, sl], yl), 'dx': get_err_ratio(x.grad[:, sl], xl.grad),
            'dw': get_err_ratio(ref_dw, dw)}


def _layer_case(rank, world, cu, mode):
    "GatedLinearAttention (short convolutions, float64) with `cp_context`: output, dx, every parameter's gradient."
    torch.manual_seed(2)
    layer = GatedLinearAttention(mode=mode, hidden_size=32, num_heads=2, use_short_conv=True, conv_size=3).double()
    return cp_layer_errors(layer, rank, world, cu, conv1d_kernel_size=3)[0]


def _attention_case(rank, world, cu, window):
    "The softmax Attention layer (GQA, float64) with `cp_context`: output, dx, parameters' gradients, bytes received."
    torch.manual_seed(2)
    layer = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=window).double()
    errs, received = cp_layer_errors(layer, rank, world, cu)
    # the all-gathered keys and values (P tokens, 2 heads of 8, float64) and int64 positions of the other ranks
    want = (world - 1) * (cu[-1] // world) * (2 * 16 * 8 + 8)
    return {**errs, 'bytes': abs(received - want) / want}


def _model_case(rank, world, cu, attn=None):
    "GLAForCausalLM (float64; `attn`: hybrid): the ranks' losses add up to the single-process loss; gradients too."
    T = cu[-1]
    torch.manual_seed(3)
    config = GLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, use_short_conv=True, vocab_size=16,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, attn=attn)
    model = GLAForCausalLM(config).double()
    ids = torch.randint(0, 16, (1, T))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels, cu_seqlens=torch.tensor(cu))
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    P = T // world
    sl = slice(rank * P, (rank + 1) * P)
    outl = model(ids[:, sl], labels=labels[:, sl], cp_context=build_cp_context(torch.tensor(cu), None))
    outl.loss.backward()
    loss = outl.loss.detach().clone()
    dist.all_reduce(loss)
    errs = {'loss': abs(loss.item() - out.loss.item()) / out.loss.item(),
            'logits': get_err_ratio(out.logits[:, sl], outl.logits)}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        errs[n] = get_err_ratio(ref[n], p.grad)
    return errs


def _training_case():
    "Chapter 13's `train` (the code torchrun runs there): three steps of DDP, FSDP2 and CP give the single-process losses."
    from myfla_gla.distributed import train
    ref = torch.tensor(train('single', steps=3, batch_size=4, seq_len=40))
    return {s: (torch.tensor(train(s, steps=3, batch_size=4, seq_len=40)) - ref).abs().max().item() / ref.mean().item()
            for s in ('ddp', 'fsdp', 'cp')}


def _bad_inputs(rank, world):
    "Bad input gives the same clear error on every rank (no rank left waiting)."
    cu = torch.tensor([0, 10, 16])
    ctx = build_cp_context(cu, None)
    P = 16 // world
    q = torch.rand(1, P + (rank == 0), 2, 4)       # rank 0's shard is one token longer
    msgs = {'shard': _errors(lambda: chunk_gla(q, q, q, -q, cp_context=ctx))}
    msgs['cu_differs'] = _errors(lambda: build_cp_context(torch.tensor([0, 8 + rank, 16]), None))
    msgs['cu_invalid_on_one'] = _errors(lambda: build_cp_context(torch.tensor([0, 9, 8 + 8 * (rank != 1)]), None))
    msgs['cu_invalid'] = _errors(lambda: build_cp_context(torch.tensor([0, 9, 8]), None))
    msgs['not_divisible'] = _errors(lambda: build_cp_context(torch.tensor([0, 3, 4 * world + 1]), None))
    q = torch.rand(1, P, 2, 4)
    msgs['initial_state'] = _errors(lambda: chunk_gla(q, q, q, -q, initial_state=torch.zeros(2, 2, 4, 4),
                                                      cp_context=ctx))
    msgs['final_state'] = _errors(lambda: chunk_gla(q, q, q, -q, output_final_state=True, cp_context=ctx))
    msgs['zigzag'] = _errors(lambda: build_cp_context(cu, None, layout='zigzag'))
    # calls that differ between ranks: every rank raises the same error, naming what differs on which ranks
    last = rank == world - 1
    x = torch.rand(1, P, 2, 4, dtype=torch.float64 if rank == 0 else torch.float32)
    msgs['dtype'] = _errors(lambda: chunk_gla(x, x, x, -x, cp_context=ctx))
    x = torch.rand(1, P, 2, 8 if last else 4)                 # another head size K on the last rank
    msgs['head_size'] = _errors(lambda: fused_chunk_gla(x, x, q, -x, cp_context=ctx))
    msgs['gate'] = _errors(lambda: fused_recurrent_gla(q, q, q, gk=-q if rank == 0 else None, cp_context=ctx))
    msgs['some_initial_state'] = _errors(lambda: chunk_gla(
        q, q, q, -q, initial_state=torch.zeros(1, 2, 4, 4) if rank == 0 else None, cp_context=ctx))
    x = q.clone().requires_grad_(rank == 0)
    msgs['gradients'] = _errors(lambda: chunk_gla(x, q, q, -q, cp_context=ctx))
    op = chunk_gla if rank == 0 else fused_recurrent_gla
    msgs['ops'] = _errors(lambda: op(q, q, q, -q, cp_context=ctx))
    x = torch.rand(1, P, 3)
    msgs['conv_width'] = _errors(lambda: causal_conv1d(x, torch.rand(3, 4 if last else 3), cp_context=ctx))
    # the group still works after the errors: a correct call
    o, _ = chunk_gla(q, q, q, -q, cp_context=ctx)
    msgs['after'] = bool(torch.isfinite(o).all())
    return msgs


def _run_2(rank, world):
    out = {}
    for op in ('chunk_gla', 'fused_chunk_gla', 'fused_recurrent_gla'):
        out[op, 'dense'] = cp_check_op(rank, world, [0, 128], op=op), torch.float32
    out['packed'] = cp_check_op(rank, world, [0, 5, 90, 128], seed=1), torch.float32
    out['strong'] = cp_check_op(rank, world, [0, 5, 90, 128], gate_logit_normalizer=0.02, seed=2), torch.float32
    out['bf16'] = cp_check_op(rank, world, [0, 5, 90, 128], dtype=torch.bfloat16, seed=3), torch.bfloat16
    for w in (2, 3, 4):
        out['conv', w] = _conv_case(rank, world, [0, 3, 13, 16], w, torch.float32), torch.float32
    out['conv_bf16'] = _conv_case(rank, world, [0, 3, 13, 16], 4, torch.bfloat16), torch.bfloat16
    out['layer'] = _layer_case(rank, world, [0, 30, 96, 140], 'chunk'), torch.float64
    out['model'] = _model_case(rank, world, [0, 7, 40, 48]), torch.float64
    out['attention'] = _attention_case(rank, world, [0, 5, 6, 12, 16], None), torch.float64
    out['attention_window'] = _attention_case(rank, world, [0, 5, 6, 12, 16], 3), torch.float64
    out['hybrid'] = _model_case(rank, world, [0, 7, 40, 48], {'layers': [1], 'num_heads': 4, 'window_size': 5}), torch.float64
    out['hgrn2'] = hgrn2_case(rank, world), torch.float64
    out['training'] = _training_case(), torch.float32
    return out, _bad_inputs(rank, world)


def _run_4(rank, world):
    # a sequence over three ranks (ends at a rank boundary), a zero-length one, a short one inside a rank
    cu = [0, 3, 48, 48, 55, 64]
    out = {'packed': (cp_check_op(rank, world, cu), torch.float32),
           'strong': (cp_check_op(rank, world, cu, gate_logit_normalizer=0.02, seed=4), torch.float32),
           'bf16': (cp_check_op(rank, world, cu, dtype=torch.bfloat16, seed=5), torch.bfloat16)}
    for w in (3, 4):   # 2 tokens a rank: width 4 reaches two ranks back
        out['conv', w] = _conv_case(rank, world, [0, 1, 1, 7, 8], w, torch.float32), torch.float32
    out['layer'] = _layer_case(rank, world, [0, 3, 48, 48, 55, 64], 'fused_chunk'), torch.float64
    out['model'] = _model_case(rank, world, [0, 9, 9, 24, 32]), torch.float64
    out['attention'] = _attention_case(rank, world, [0, 9, 9, 24, 32], 5), torch.float64
    return out, _bad_inputs(rank, world)


def _check(results):
    for rank, (out, msgs) in enumerate(results):
        for case, (errs, dtype) in out.items():
            bound = DEFAULT_RATIO[dtype] if dtype != torch.float64 else 1e-10
            for name, e in errs.items():
                assert e <= bound, f'rank {rank} {case} {name}: relative error {e:.2e} > {bound:.0e}'
        assert msgs['shard'] and 'every rank' in msgs['shard'], msgs['shard']
        assert msgs['cu_differs'] and 'same global boundaries' in msgs['cu_differs'], msgs['cu_differs']
        assert msgs['cu_differs'].endswith(f'on ranks {list(range(1, len(results)))} it differs from rank 0\'s '
                                           f'(lengths {[3] * len(results)}, totals {[16] * len(results)})'), msgs['cu_differs']
        assert msgs['cu_invalid_on_one'].endswith('never decreases, on every rank; on ranks [1] it is not')
        assert msgs['cu_invalid'] == 'ValueError: `cu_seqlens` must start at 0 and never decrease, got [0, 9, 8]'
        assert msgs['not_divisible'] and 'multiple of the group size' in msgs['not_divisible'], msgs['not_divisible']
        assert msgs['initial_state'] and '`initial_state`' in msgs['initial_state']
        assert msgs['final_state'] and '`output_final_state=True`' in msgs['final_state']
        assert msgs['zigzag'] and msgs['zigzag'].startswith('NotImplementedError')
        assert msgs['after'] is True
        W = len(results)
        others = lambda first: f"rank{'s' if W > 2 else ''} {', '.join(map(str, range(first, first + W - 1)))}"
        expected = {
            'dtype': f'`q` dtype: float64 on rank 0; float32 on {others(1)}. `k` dtype:',
            'head_size': f'`q` shape: (1, {16 // W}, 2, 4) on {others(0)}; (1, {16 // W}, 2, 8) on rank {W - 1}',
            'gate': f'`gk`: a tensor on rank 0; None on {others(1)}',
            'some_initial_state': f'`initial_state` given: yes on rank 0; no on {others(1)}',
            'gradients': f'inputs requiring gradients: yes on rank 0; no on {others(1)}',
            'ops': f'every rank must run the same op at once; chunk_gla on rank 0; fused_recurrent_gla on {others(1)}',
            'conv_width': f'`weight` shape: (3, 3) on {others(0)}; (3, 4) on rank {W - 1}',
        }
        for case, text in expected.items():
            assert msgs[case] and msgs[case].startswith('ValueError') and text in msgs[case], (case, msgs[case])
        for case, message in msgs.items():   # the same error on every rank
            assert message == results[0][1][case], (case, rank, message, results[0][1][case])


def test_cp_two_ranks():
    _check(run_on_ranks(_run_2, 2, timeout=TIMEOUT))


def test_cp_four_ranks():
    _check(run_on_ranks(_run_4, 4, timeout=TIMEOUT))


def test_cp_group_of_one(tmp_path):
    "A group of one rank: the context is the whole batch, and the result is exactly the op without a context."
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        cu = torch.tensor([0, 5, 40])
        ctx = build_cp_context(cu, None, conv1d_kernel_size=4)
        assert ctx.is_first_rank and ctx.is_last_rank and ctx.pre_num_ranks == 0 and ctx.post_num_ranks == 0
        assert ctx.cu_seqlens.tolist() == [0, 5, 40] and ctx.num_seqs == 2
        with pytest.raises(ValueError, match='`cu_seqlens_cpu` must be a copy of `cu_seqlens`'):
            build_cp_context(cu, None, cu_seqlens_cpu=torch.tensor([0, 6, 40]))
        from myfla_gla.testing import random_gla_inputs
        q, k, v, g = random_gla_inputs(1, 40, 2, 8, generator=torch.Generator().manual_seed(0))
        o_ref, _ = chunk_gla(q, k, v, g, cu_seqlens=cu)
        o, _ = chunk_gla(q, k, v, g, cp_context=ctx)
        assert get_err_ratio(o_ref, o) < 1e-6
        x, w = torch.randn(1, 40, 3), torch.randn(3, 4)
        torch.testing.assert_close(causal_conv1d(x, w, cp_context=ctx)[0], causal_conv1d(x, w, cu_seqlens=cu)[0])
    finally:
        dist.destroy_process_group()


def test_cp_needs_a_process_group():
    with pytest.raises(RuntimeError, match='process group'):
        build_cp_context(torch.tensor([0, 8]), None)
