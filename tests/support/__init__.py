"""The harness: a served instance (serving.py), throwaway Redis and PostgreSQL (servers.py), a real
Prometheus (prometheus.py), the HTTP contract checks (contract.py). Imported by tests/ and loadtests/."""
