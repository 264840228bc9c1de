"""Every suite a make verb runs, a module or folder each: `make loadtest` (run.py, the plan and its
runner), `make bench` (bench/), `make chaos` (chaos/), `make abuse` (abuse/), `make bench-jobs`
(jobs/), `make bench-analytics` (analytics.py). They share harness.py (the texts, the /metrics
reader, the percentile, the Locust launcher, teardown), locustfile.py (every suite's traffic) and
report/ (the figures, the markdown tables, the plots).
Imports service.config, models, storage (analytics.py seeds and ships rows) and the harness in tests/support;
service/ and storage/ never import it."""
