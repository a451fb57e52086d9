"""analysis: read sweep results into pandas, compute the frontier, plot and report (no Ray needed)."""
