"""The layer's time against its op plus its projections' products alone, on the CPU, one process, interleaved rounds.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python tests/layer_speed.py [rounds]

At the bench's cpu preset (B=2 T=4096 H=4 K=V=128 float32, the bench's layer: hidden 512, expand_k=expand_v=1):
`chunk_gla` alone on inputs of the layer's shapes; the projections alone (q/k/v/g, the gate's low-rank pair, o, as
`nn.Linear` products with their backward); the layer. The minimum over rounds (in alternating order) of the
minimum of 3 calls, forward (no grad) and forward+backward (gradients of the input and every parameter)."""
import os
import sys
import time

import torch
import torch.nn.functional as F

from myfla_gla import GatedLinearAttention, chunk_gla

torch.set_num_threads(1)
B, T, H, K = 2, 4096, 4, 128
D = H * K
torch.manual_seed(0)
layer = GatedLinearAttention(mode='chunk', layer_idx=0, hidden_size=D, expand_k=1.0, expand_v=1.0, num_heads=H)
x = torch.randn(B, T, D, requires_grad=True)
with torch.no_grad():
    q, k, v = (p(x).unflatten(-1, (H, K)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    g = (F.logsigmoid(layer.gk_proj(x)) / layer.gate_logit_normalizer).unflatten(-1, (H, K))
q, k, v, g = (t.contiguous().requires_grad_() for t in (q, k, v, g))
o_in = torch.randn(B, T, D, requires_grad=True)                  # the o projection's input
linears = (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.gk_proj)
cases = {   # name: (outputs, leaves to differentiate)
    'op': (lambda: [chunk_gla(q, k, v, g)[0]], [q, k, v, g]),
    'projections': (lambda: [m(x) for m in linears] + [layer.o_proj(o_in)],
                    [x, o_in, *(p for m in (*linears, layer.o_proj) for p in m.parameters())]),
    'layer': (lambda: [layer(x)[0]], [x, *layer.parameters()]),
}
grads = {name: [torch.randn_like(o) for o in f()] for name, (f, _) in cases.items()}


def run(name, backward):
    f, leaves = cases[name]
    if backward:
        torch.autograd.grad(f(), leaves, grads[name])
    else:
        with torch.no_grad():
            f()


def best(name, backward, calls=3):
    t = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(name, backward)
        t.append(time.perf_counter() - t0)
    return min(t) * 1e3


times = {}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for name in (list(cases) if r % 2 else list(cases)[::-1]):   # alternate the order: no case always runs first
        for backward in (False, True):
            times.setdefault((name, backward), []).append(best(name, backward))
for backward, what in ((False, 'forward'), (True, 'forward+backward')):
    ms = {name: min(times[name, backward]) for name in cases}
    base = ms['op'] + ms['projections']
    print(f'{what}: ' + ', '.join(f'{n} {t:.1f} ms' for n, t in ms.items()))
    print(f'  layer / (op + projections): {ms["layer"] / base:.2f}')
print('load average', os.getloadavg())
