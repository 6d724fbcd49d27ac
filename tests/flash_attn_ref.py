"""A float64 stand-in for the `flash_attn` package, for tests that run FLA's own `Attention` layer without flash-attn.

FLA's `fla.layers.attn` imports `flash_attn_func` and `flash_attn_varlen_func` and refuses to build its layer without
them. `install()` puts this module in their place (in `sys.modules` before FLA imports them, and on FLA's module
if it is already imported). Both compute flash-attn's definition, written out per sequence in
float64: softmax(q k^T * scale) v over the keys j a query i may see, with the causal mask aligned bottom-right
(query i of Lq is the token of key i + Lk - Lq) and `window_size=(left, right)` (-1: unbounded); a query with no
key gives zeros. The result has q's dtype.
"""
import importlib.machinery
import sys
import types

import torch


def _one_sequence(q, k, v, softmax_scale, causal, window_size):
    "q [Lq, H, D], k and v [Lk, H_kv, D] -> [Lq, H, D] in float64."
    Lq, H, D = q.shape
    Lk, Hk = k.shape[:2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    k, v = (x.double().repeat_interleave(H // Hk, dim=1) for x in (k, v))   # GQA: query head h reads h // (H / H_kv)
    i = torch.arange(Lq, device=q.device)[:, None] + Lk - Lq                # each query's key index (bottom-right)
    j = torch.arange(Lk, device=q.device)[None]
    seen = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        seen &= j <= i
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    s = torch.einsum('qhd,khd->hqk', q.double(), k) * scale
    p = torch.softmax(s.masked_fill(~seen, float('-inf')), -1).nan_to_num(0.)   # a query with no key: zeros
    return torch.einsum('hqk,khd->qhd', p, v)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), *args, **kwargs):
    "q [B, Lq, H, D], k and v [B, Lk, H_kv, D]."
    return torch.stack([_one_sequence(q[b], k[b], v[b], softmax_scale, causal, window_size)
                        for b in range(q.shape[0])]).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), *args, **kwargs):
    "q [total_q, H, D], k and v [total_k, H_kv, D], sequences delimited by cu_seqlens_q / cu_seqlens_k."
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return torch.cat([_one_sequence(q[cq[n]:cq[n + 1]], k[ck[n]:ck[n + 1]], v[ck[n]:ck[n + 1]], softmax_scale, causal,
                                    window_size) for n in range(len(cq) - 1)]).to(q.dtype)


def install():
    "Make `import flash_attn` give this stand-in, and point an already imported `fla.layers.attn` at it."
    mod = types.ModuleType('flash_attn')
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    mod.__version__ = '0.0.0+float64-reference'
    mod.__spec__ = importlib.machinery.ModuleSpec('flash_attn', None)   # for importlib.util.find_spec
    sys.modules['flash_attn'] = mod
    if 'fla.layers.attn' in sys.modules:
        fla_attn = sys.modules['fla.layers.attn']
        fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod
