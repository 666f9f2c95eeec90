"""Tests of `examples/`: the table-to-text worked example and `make demo`."""
