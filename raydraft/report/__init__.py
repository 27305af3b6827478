"""The run report: `page.write_report` turns a run directory into one self-contained
report.html, drawn by `charts` from the `panels` that metrics.jsonl gives."""
