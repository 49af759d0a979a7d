#!/usr/bin/env python
"""One table from Nsight Compute's CSV: for each profiled kernel launch, the figures that say
whether it is bound by memory, latency or occupancy.

    ncu --csv --page details --section SpeedOfLight --section Occupancy ... python prog.py > run.csv
    python scripts/ncu_summary.py run.csv [more.csv ...] [--json out.json]

``scripts/gpu_visit_train.sh`` (stage ``ncu``) runs ncu that way and this script on its output.
The CSV holds one row per (launch, metric) after ncu's own ``==PROF==`` lines and whatever the
profiled program printed; this reads the rows from the header line on, keeps the metrics below
(those that the chosen sections report), and prints one row per launch with the mean over all
launches of the same kernel after it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections import defaultdict

# Metric name in ncu's details page -> column title. Shown in this order when present.
METRICS = {
    "Duration": "time",
    "SM Frequency": "SM clock",
    "Compute (SM) Throughput": "SM %",
    "Memory Throughput": "mem %",
    "DRAM Throughput": "DRAM %",
    "L1/TEX Hit Rate": "L1 hit",
    "L2 Hit Rate": "L2 hit",
    "Registers Per Thread": "regs",
    "Theoretical Occupancy": "occ. theor.",
    "Achieved Occupancy": "occ. achieved",
    "Waves Per SM": "waves",
    "Issue Slots Busy": "issue %",
    "No Eligible": "no eligible %",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
    # what the kernel moves (ncu --metrics; gpu_visit_train.sh asks for them): DRAM bytes, and the
    # 32-byte L2 sectors L1 reads and writes (against the bytes the kernel needs, what partial
    # sectors and re-reads cost)
    "dram__bytes_read.sum": "DRAM rd",
    "dram__bytes_write.sum": "DRAM wr",
    "lts__t_sectors_srcunit_tex_op_read.sum": "L2 sectors rd",
    "lts__t_sectors_srcunit_tex_op_write.sum": "L2 sectors wr",
}
# ncu scales units per value (one launch in Kbyte, the next in Mbyte): byte counts are read as MB
# and sector counts as millions, so that launches compare and average.
UNIT_SCALE = {"byte": (1e-6, "MB"), "Kbyte": (1e-3, "MB"), "Mbyte": (1.0, "MB"), "Gbyte": (1e3, "MB"),
              "sector": (1e-6, "Msector"), "Ksector": (1e-3, "Msector"),
              "Msector": (1.0, "Msector"), "Gsector": (1e3, "Msector")}
# Per-reason stall counters (ncu --metrics "regex:smsp__average_warps_issue_stalled_.*"): the
# average number of warps held back by each reason per issued instruction. They add up to about
# "cycles/issue" and say which latency a latency-bound kernel waits on (long_scoreboard: global
# or local memory; barrier: __syncthreads; short_scoreboard / mio_throttle: shared memory and the
# special-function unit; math_pipe_throttle: a busy pipe; wait: fixed-latency dependencies).
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")


def read_rows(path: str) -> list[dict[str, str]]:
    """The CSV rows of one ncu run (lines before ncu's header and the program's own output are
    skipped)."""
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    body = [lines[start]] + [line for line in lines[start + 1:] if line.startswith('"')]
    return list(csv.DictReader(body))


def launches(rows: list[dict[str, str]]) -> list[dict]:
    """-> one dict per launch: id, kernel, grid, block and {metric: (value, unit)}."""
    by_id: dict[str, dict] = {}
    for row in rows:
        name = row.get("Metric Name")
        stall = STALL.fullmatch(name or "")
        if stall:
            name = "stall " + stall.group(1)
        elif name not in METRICS:
            continue
        launch = by_id.setdefault(row["ID"], dict(
            id=int(row["ID"]), kernel=row.get("Kernel Name", "?").split("(")[0],
            grid=row.get("Grid Size", ""), block=row.get("Block Size", ""), metrics={}))
        value = row.get("Metric Value", "").replace(",", "")
        unit = row.get("Metric Unit", "")
        scale, unit = UNIT_SCALE.get(unit, (1.0, unit))
        try:
            launch["metrics"][name] = (float(value) * scale, unit)
        except ValueError:
            continue
    return sorted(by_id.values(), key=lambda launch: launch["id"])


def summarize(paths: list[str]) -> dict:
    out = {}
    for path in paths:
        runs = launches(read_rows(path))
        values = defaultdict(lambda: defaultdict(list))  # kernel -> metric -> [(value, unit)]
        for launch in runs:
            for name, value_unit in launch["metrics"].items():
                values[launch["kernel"]][name].append(value_unit)
        means = {kernel: {name: (statistics.fmean(v for v, _ in pairs), pairs[0][1])
                          for name, pairs in metrics.items()}
                 for kernel, metrics in values.items()}
        out[path] = {"launches": runs, "mean_by_kernel": means}
    return out


def fmt(value_unit) -> str:
    if value_unit is None:
        return "-"
    value, unit = value_unit
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def print_tables(summary: dict) -> None:
    for path, result in summary.items():
        columns = [m for m in METRICS if any(m in launch["metrics"] for launch in result["launches"])]
        print(f"== {path}: {len(result['launches'])} launches")
        if not columns:
            print("   no known metrics in this file (did ncu run? see its log)")
            continue
        header = ["kernel", "id", "grid"] + [METRICS[m] for m in columns]
        rows = [[launch["kernel"][:28], str(launch["id"]), launch["grid"]]
                + [fmt(launch["metrics"].get(m)) for m in columns] for launch in result["launches"]]
        rows += [[f"{kernel[:23]} mean", "", ""] + [fmt(means.get(m)) for m in columns]
                 for kernel, means in result["mean_by_kernel"].items()]
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        for kernel, means in result["mean_by_kernel"].items():
            stalls = sorted(((v, name[6:]) for name, (v, _) in means.items()
                             if name.startswith("stall ")), reverse=True)
            if stalls:
                print(f"   {kernel[:40]} stalls (warps per issue): "
                      + ", ".join(f"{reason} {v:.2f}" for v, reason in stalls[:8] if v >= 0.005))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="ncu --csv --page details output files")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    summary = summarize(args.csv)
    print_tables(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if any(r["launches"] for r in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
