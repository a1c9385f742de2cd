"""Per-prompt scores of the grid, one column per method (1 = answered). Usage: python prompts.py eval-shipped ..."""

import json
import sys

cols, table = [], {}
for folder in sys.argv[1:]:
    for method in json.load(open(f"{folder}/results.json"))["methods"]:
        name = f"{folder.rstrip('/').split('/')[-1].removeprefix('eval-')}:{method['name']}"
        cols.append(name)
        for r in method["results"]:
            table.setdefault((r["task"], r["length"], r["depth"], r["sample"]), {})[name] = r["score"]
print("prompt".ljust(26) + " ".join(c[-18:].rjust(18) for c in cols))
for key in sorted(table):
    print(
        f"{key[0]:7s} {key[1]:5d} d{key[2]} s{key[3]}".ljust(26)
        + " ".join(f"{table[key].get(c, float('nan')):18g}" for c in cols)
    )
