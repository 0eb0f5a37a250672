"""Reports from the results store: selection on validation, tables, diagnostics, paired comparisons, figures."""
