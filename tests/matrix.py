"""Pairwise-covering configuration matrices, shared by the CPU and the GPU (FLA-parity) layer tests, the layer
arguments of one case (FLA's constructor accepts the same), and the random weights that make every parameter count."""
import itertools

import torch


def pairwise(factors: dict) -> list[dict]:
    "A small set of cases in which every pair of levels of any two factors appears at least once (greedy cover)."
    names = list(factors)
    combos = list(itertools.product(*factors.values()))
    pairs = lambda c: {(i, c[i], j, c[j]) for i in range(len(c)) for j in range(i + 1, len(c))}
    todo, chosen = set().union(*(pairs(c) for c in combos)), []
    while todo:
        best = max(combos, key=lambda c: len(pairs(c) & todo))
        todo -= pairs(best)
        chosen.append(dict(zip(names, best)))
    return chosen


def layer_kwargs(case, hidden=32, heads=4):
    "`GatedLinearAttention` arguments of a matrix case (keys: mode, conv, gate, gqa, feature_map, gates)."
    gate = case['gate']
    normalizer, clamp = case['gates']
    return dict(mode=case['mode'], hidden_size=hidden, num_heads=heads, num_kv_heads=heads // case['gqa'],
                expand_k=0.5, expand_v=1.0, feature_map=case['feature_map'], use_short_conv=case['conv'] is not None,
                conv_size=3, conv_bias=case['conv'] == 'conv+bias', use_output_gate=gate != 'none',
                gate_fn={'silu': 'silu', 'sigmoid': 'sigmoid'}.get(gate, 'swish'),
                fuse_norm=gate != 'swish-unfused', elementwise_affine=gate != 'fused-no-affine',
                gate_logit_normalizer=normalizer, clamp_min=clamp, gate_low_rank_dim=8)


def randomize_norms_and_biases(layer):
    "Norm weights in [0.5, 1.5] and biases in [-1, 1] (not their defaults 1 and 0), so that a mix-up shows; in place."
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if 'norm' in name:
                p.uniform_(0.5, 1.5)
            elif 'bias' in name:
                p.uniform_(-1, 1)
    return layer
