"""GSM8K client for a running edgeserve: dataset, grading, HTTP runner, report, quality-curve sweep."""
