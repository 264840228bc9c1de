"""`make chaos`: faults injected under load, and whether every answered prediction was stored once.

__main__.py (the profiles, the run, the report: report.md, report.json, timeline.png), faults.py
(each fault, the timeline that injects them, and the tally of answered ids against the analytics
table, statuses and latency); the traffic is loadtests/locustfile.py's ChaosUser.
"""
