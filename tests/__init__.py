"""The test suite (`make test`): folders mirror the packages (`api/`, `engine/`, `prefix_store/`,
`tenancy/`, `trainer/`, `clients/`), multi-process tests against real servers and Redis are in
`integration/`; helpers here start servers, Redis and Prometheus, build tiny models, and run the
README's and docs' shell blocks (`readme_runner.py`)."""
