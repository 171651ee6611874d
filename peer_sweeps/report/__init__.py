"""The report of a results directory: isoFLOP fits, frontiers, Table-1/2-style tables, figures (issue 6)."""

from peer_sweeps.report.write import write_report

__all__ = ["write_report"]
