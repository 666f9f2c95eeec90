"""Worked examples against a running server: `table_to_text/`, the paper's table-to-text task in
miniature (`make demo`)."""
