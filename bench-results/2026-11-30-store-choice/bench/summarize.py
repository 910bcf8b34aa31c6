#!/usr/bin/env python3
"""Median (min-max) of every numeric field of the RESULT lines in a run.sh output."""
import re, sys, statistics
from collections import defaultdict

rows = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "):
        continue
    parts = line.split()[1:]
    kind = parts[0]
    kv = [p.split("=", 1) for p in parts[1:] if "=" in p]
    ident = [f"{k}={v}" for k, v in kv if k in ("engine", "durable", "group", "mode", "compaction", "round")]
    key = kind + " " + " ".join(ident)
    for k, v in kv:
        if re.fullmatch(r"-?[0-9.]+", v) and k not in ("group", "round"):
            rows[key][k].append(float(v))
        elif k not in ("engine", "durable", "mode", "compaction", "round", "group"):
            rows[key][k].append(v)
for key, fields in rows.items():
    out = []
    for k, vs in fields.items():
        if isinstance(vs[0], float):
            if len(vs) == 1:
                out.append(f"{k}={vs[0]:g}")
            else:
                out.append(f"{k}={statistics.median(vs):g}({min(vs):g}-{max(vs):g})")
        else:
            out.append(f"{k}={','.join(vs)}")
    print(key, "|", " ".join(out))
