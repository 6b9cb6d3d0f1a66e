#!/usr/bin/env python
"""Result records -> ablation tables (Markdown + LaTeX), seaborn figures, sample-grid pages, one report.

    python reports/make_tables.py                              # reads results/, writes results/report/
    python reports/make_tables.py --results R --out O
    python reports/make_tables.py --target-fid 12      # the FID of the "speed at equal FID" table

Rules: measured rows come only from the records (d2c.results, schema 1); published numbers
(reports/published.csv) get their own section and are never mixed in; runs on different hardware
(cpu_model + gpu_name) are never averaged together; several seeds of one cell show as
"mean ± std (n)".  A malformed record is named and skipped.  Exit 0 (also for no records),
2 when the results path does not exist.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2c import require
from d2c.cli import exit_on_user_error

with exit_on_user_error():     # the core package alone: one line naming the extra
    for _m in ("pandas", "seaborn", "markdown"):
        require(_m, "the report (reports/make_tables.py, d2c-report)")
from d2c_reports.load import load, log  # noqa: E402
from d2c_reports.page import build_report  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="results folder of the harness (holds records/)")
    ap.add_argument("--out", default=None, help="report folder (default: <results>/report)")
    ap.add_argument("--published", default=str(HERE / "published.csv"), help="published numbers (CSV)")
    ap.add_argument("--target-fid", type=float, default=None, metavar="FID",
                    help="the FID of the table 'speed at equal FID' (default: the best on the slowest family's front)")
    args = ap.parse_args(argv)
    if args.target_fid is not None and not args.target_fid > 0:
        ap.error(f"--target-fid {args.target_fid}: allowed: numbers > 0")
    results = Path(args.results)
    if not results.is_dir():
        log(f"results path {str(results)!r} does not exist (or is not a folder); nothing to report")
        return 2
    out = Path(args.out) if args.out else results / "report"
    runs, problems = load(results)
    for p in problems:
        log(f"skipped malformed record: {p}")
    if runs.empty:
        log(f"no valid result records under {results / 'records'}: nothing measured yet")
    try:
        wrote = build_report(runs, problems, results, out, Path(args.published), args.target_fid)
    except OSError as e:  # e.g. a read-only report folder
        log(f"cannot write the report to {out}: {e}")
        return 1
    n_ok = int((runs["status"] == "ok").sum()) if len(runs) else 0
    if len(runs) and not n_ok:
        log("no successful runs: the report lists the failed ones only")
    print(f"make_tables: wrote {out / 'report.md'} (+ .html): {n_ok} ok, {len(runs) - n_ok} failed, "
          f"{len(problems)} malformed; {len(wrote['tables'])} table files, {len(wrote['figures'])} figure files, "
          f"{len(wrote['grids'])} grid pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
