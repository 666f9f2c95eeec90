"""Benchmarks, run by hand or by `make bench` (never as timed tests): throughput against PEFT,
the prefix store, the cluster and routing, the soak test, hostile tenants, GPU checks. Results go
to `bench/results/` and the marked sections of docs/benchmarks.md."""
