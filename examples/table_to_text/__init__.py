"""Table-to-text (E2E style) in miniature on the demo model: the data set, `make demo` (three
tasks trained, served in one mixed batch) and the comparison of docs/training.md."""
