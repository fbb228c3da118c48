#!/usr/bin/env python3
"""Summarize scripts/bench-compare.sh output: a markdown table of medians (coffer, PostgreSQL,
axum ceiling, each measured in the same run window) and an SVG chart of throughput and p99
against connections. No dependencies beyond the standard library."""
import csv, statistics as st, sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
def rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []

coffer = defaultdict(list)
for r in rows(out / "coffer.csv"):
    coffer[(r["workload"], int(r["connections"]), int(r["batch"]))].append(r)
pg = defaultdict(list)
for r in rows(out / "pgres" / "pg_results.csv"):
    pg[(r["label"], int(r["clients"]))].append(r)
axum = [float(r["rps"]) for r in rows(out / "httpres" / "http_results.csv")
        if r["config"] == "unpinned" and r["endpoint"] == "echo"]
ceiling = st.median(axum) if axum else float("nan")
med = lambda rs, k: st.median(float(x[k]) for x in rs) if rs else float("nan")

PG_OF = {"uniform": "a_uniform", "hot": "b_hot", "hold-capture": "c_hold_capture"}
print(f"axum no-op POST echo ceiling (64 connections, unpinned): {ceiling:,.0f} req/s "
      f"(median of {len(axum)})\n")
print("| workload | conns | batch | coffer ops/s | coffer p99 ms | PostgreSQL TPS | PG p99 ms | coffer / PG | coffer / axum echo | runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
points = defaultdict(list)
for (w, c, b), rs in sorted(coffer.items()):
    ops, p99 = med(rs, "flows_per_sec"), med(rs, "p99_ms")
    pr = pg.get((PG_OF.get(w, ""), c), []) if b == 1 else []
    ptps, pp99 = med(pr, "tps"), med(pr, "lat_p99_ms")
    req = med(rs, "requests_per_sec")
    pg_cells = f"{ptps:,.0f} | {pp99:.1f} | {ops / ptps:.1f}x" if pr else "- | - | -"
    axum_cell = f"{req / ceiling:.0%}" if b == 1 and ceiling == ceiling else "-"
    print(f"| {w} | {c} | {b} | {ops:,.0f} | {p99:.2f} | {pg_cells} | {axum_cell} | {len(rs)} |")
    if b == 1:
        points[w].append((c, ops, p99, ptps, pp99))

# SVG: two panels (throughput, p99) with one line per system and workload.
W, H, PAD = 920, 360, 60
colors = {"uniform": "#1f77b4", "hot": "#d62728", "hold-capture": "#2ca02c"}
def panel(x0, title, idx_coffer, idx_pg, log=True):
    import math
    vals = [p[i] for ps in points.values() for p in ps for i in (idx_coffer, idx_pg) if p[i] == p[i] and p[i] > 0]
    if not vals:
        return ""
    lo, hi = min(vals) / 1.5, max(vals) * 1.5
    conns = sorted({p[0] for ps in points.values() for p in ps})
    pw = W / 2 - PAD * 1.5
    xs = lambda c: x0 + PAD + (conns.index(c) + 0.5) * pw / len(conns)
    ys = lambda v: PAD / 2 + (H - PAD * 1.5) * (1 - (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)))
    s = [f'<text x="{x0 + PAD}" y="20" font-size="14">{title} (log scale)</text>',
         f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + PAD + pw}" y2="{H - PAD}" stroke="black"/>',
         f'<line x1="{x0 + PAD}" y1="{PAD / 2}" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>']
    for c in conns:
        s.append(f'<text x="{xs(c) - 10}" y="{H - PAD + 16}" font-size="11">{c}</text>')
    s.append(f'<text x="{x0 + PAD + pw / 2 - 30}" y="{H - PAD + 32}" font-size="11">connections</text>')
    for k in range(0, 5):
        v = math.exp(math.log(lo) + k * (math.log(hi) - math.log(lo)) / 4)
        label = f"{v:,.0f}" if v >= 10 else f"{v:.2g}"
        s.append(f'<text x="{x0 + 2}" y="{ys(v) + 4}" font-size="10">{label}</text>')
    for w, ps in points.items():
        ps = sorted(ps)
        for idx, dash in ((idx_coffer, ""), (idx_pg, ' stroke-dasharray="5,4"')):
            pts = [(xs(p[0]), ys(p[idx])) for p in ps if p[idx] == p[idx] and p[idx] > 0]
            if pts:
                s.append(f'<polyline fill="none" stroke="{colors.get(w, "gray")}" stroke-width="2"{dash} points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
                s += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colors.get(w, "gray")}"/>' for x, y in pts]
    return "\n".join(s)
legend = [f'<text x="{PAD + 140 * i}" y="{H + 20}" font-size="12" fill="{colors[w]}">{w}</text>'
          for i, w in enumerate(colors)]
legend.append(f'<text x="{PAD + 430}" y="{H + 20}" font-size="12">solid: coffer, dashed: PostgreSQL 15 (pgbench)</text>')
svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 30}" font-family="sans-serif">'
       '<rect width="100%" height="100%" fill="white"/>'
       + panel(0, "throughput, ops/s", 1, 3) + panel(W / 2, "p99 latency, ms", 2, 4) + "\n".join(legend) + "</svg>")
(out / "chart.svg").write_text(svg)
