"""Pairwise-covering configuration matrices, shared by the CPU and the GPU (FLA-parity) layer tests."""
import itertools


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
