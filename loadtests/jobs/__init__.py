"""`make bench-jobs`: the bulk jobs' standing measurements. throughput.py: a 100,000-text job on an
idle instance against the raw model (the goal: 80% of it); beside.py: interactive latency with and
without jobs running (the goal: p95 at most x1.10)."""
