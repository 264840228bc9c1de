"""The load tests and the benchmark: Locust files, the plan, the runner, reports and plots, `make bench`.
Imports service.config, models and the harness in tests/support; service/ and storage/ never import it."""
