"""d2c_reports: the harness's result records -> ablation tables, figures, grid pages, one report.

    load.py         records -> runs / cells DataFrames, the column schema and sort order
    tables.py       one table per ablation axis (Markdown, LaTeX), the Pareto front
    figures.py      speed vs FID, FID vs steps, stage times (seaborn; PNG + PDF)
    page.py         the report folder: report.md/.html, per-hardware tables and figures, grid pages
    make_tables.py  the command (`python reports/make_tables.py`, `d2c-report`, `python -m d2c_reports`)
"""
