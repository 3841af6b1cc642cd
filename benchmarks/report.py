"""Turn a step-benchmark JSON into its report: derived numbers, markdown, CSV and PNG plots.

``python benchmarks/report.py RESULTS.json`` regenerates ``RESULTS.md``, ``RESULTS.csv``,
``RESULTS_tokens.png`` and ``RESULTS_memory.png`` beside it; ``bench_step.py`` calls the same
functions at the end of a run. Formulas used here are stated in the markdown they produce. The pieces:
``report_derive.py`` (the derived numbers), ``report_md.py`` (the markdown), ``report_plots.py`` (the PNGs),
``bench_env.py`` (the machine's description in ``meta``); this module owns the CSV and writing them all.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from report_derive import derive
from report_md import markdown, short_error, sorted_records
from report_plots import plot

CSV_FIELDS = (
    "model",
    "batch_size",
    "seq_len",
    "system",
    "mode",
    "status",
    "step_time_s",
    "tokens_per_s",
    "model_tflops",
    "gpu_peak_allocated_bytes",
    "gpu_peak_reserved_bytes",
    "host_rss_peak_bytes",
    "pinned_bytes",
    "setup_time_s",
    "error",
)


def write_csv(results: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted_records(results):
            w.writerow({k: (r.get(k) if k != "error" else short_error(r)) for k in CSV_FIELDS})


def write_all(results: dict[str, Any], json_path: Path) -> list[Path]:
    """Derive, then write JSON, markdown, CSV and plots next to ``json_path``; returns the paths."""
    results["derived"] = derive(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=str))
    stem = json_path.with_suffix("")
    # Names like "llama3.2-3b" contain dots: append, never with_suffix (it would cut at "llama3").
    md = stem.parent / (stem.name + ".md")
    md.write_text(markdown(results))
    csv_path = stem.parent / (stem.name + ".csv")
    write_csv(results, csv_path)
    return [json_path, md, csv_path, *plot(results, stem)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/report.py RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for p in write_all(json.loads(path.read_text()), path):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
