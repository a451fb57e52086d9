"""analysis: a run's results as pandas tables, the reconstruction-interpretability frontier, the paper's claims
checked on the run's own numbers, plots and a Markdown report. Reads parquet with pandas/pyarrow; never needs
Ray."""

from analysis.claims import claims_table
from analysis.frontier import family, frontier_table, pareto_mask
from analysis.report import write_report
from analysis.run import RunTables, load_run, training_curves

__all__ = [
    "RunTables",
    "claims_table",
    "family",
    "frontier_table",
    "load_run",
    "pareto_mask",
    "training_curves",
    "write_report",
]
