"""Streaming-head overlap between patterns at a sparsity, cut with each pattern's ranking (HeadPattern.binarize).
Usage: python overlap.py NAME=PATH ... (PATH: pattern.json or a shipped name). Prints, per sparsity, the streaming
heads each pair shares, and whether each pattern's layouts are nested and where its cut falls (tie_structure)."""

import itertools
import sys

from duohead.pattern import HeadPattern, find_pattern, tie_structure

pats = {}
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    pats[name] = HeadPattern.load(find_pattern(path))

for s in (0.25, 0.5, 0.75):
    stream = {n: ~p.binarize(sparsity=s) for n, p in pats.items()}
    k = int(next(iter(stream.values())).sum())
    print(f"sparsity {s:g}: {k} streaming heads each")
    for n, p in pats.items():
        t = tie_structure(p.order_scores, s)
        has = "yes" if p.ranking is not None else "no "
        print(f"  {n:10s} ranking={has} cut score {t['cut_gate']:.3f} tied {t['tied']} inside_tie {t['inside_tie']}")
    for a, b in itertools.combinations(pats, 2):
        shared = int((stream[a] & stream[b]).sum())
        print(f"  {a:10s} vs {b:10s}: {shared} of {k} shared")
# nestedness of each pattern's own layouts
for n, p in pats.items():
    s50, s75 = ~p.binarize(sparsity=0.5), ~p.binarize(sparsity=0.75)
    print(f"{n}: 50% streaming set inside 75% set: {bool((s50 & ~s75).sum() == 0)}")
