"""Reporting: finished runs' records as tables, significance tests, plots, sweep summaries and
sensitivity tables; which jobs an experiment declares. Reads records and configs only: no model
library is imported here."""
