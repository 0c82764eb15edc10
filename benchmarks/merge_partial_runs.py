"""Merge the quick profile run split over processes (benchmarks/results/minilm_sentiment*) into one
results.json / results.md / accuracy_vs_params.png under benchmarks/results/minilm_sentiment/ (a later
row of the same method and ratio wins).

    python benchmarks/merge_partial_runs.py
"""
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from minilm_sentiment import write_table
main = json.loads(Path("benchmarks/results/minilm_sentiment/results.json").read_text())
parts = [main]
for extra in ("minilm_sentiment_r07", "minilm_sentiment_ablation"):
    path = Path(f"benchmarks/results/{extra}/results.json")
    if path.exists():
        parts.append(json.loads(path.read_text()))
merged = dict(main)
merged["command"] = " ; ".join(dict.fromkeys(c for p in parts for c in p["command"].split(" ; ")))
rows = {}
for p in parts:
    for row in p["rows"]:
        rows[(row["method"], row["ratio"])] = row
merged["rows"] = list(rows.values())
merged["note"] = ("two processes of the same profile and seed; the first was stopped after the ft row to give the CPU to the second "
                  "(ratio 0.7, joint and ft_c_ft). In these runs the loader's generator was not reseeded per method: ft and ft S/2 saw "
                  "the first batches of the seeded order, joint the batches after ft S/2 (fixed in the harness since).")
for p in parts:
    merged.setdefault("latency", {}).update(p.get("latency", {}))
out = Path("benchmarks/results/minilm_sentiment")
(out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
write_table(merged, out)
print((out / "results.md").read_text())
md = out / "results.md"
md.write_text(md.read_text() + "\nNote: " + merged["note"] + "\n")
