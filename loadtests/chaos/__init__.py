"""`make chaos`: faults injected under load, and whether every answered prediction was stored once.

plan.py (the profiles and the faults' timeline), locustfile.py (the traffic, one record per
request), faults.py (each fault and the timeline), tally.py (answered ids against the analytics
table, statuses, latency), report.py (report.md, report.json, timeline.png); `python -m
loadtests.chaos` runs it all (__main__.py).
"""
