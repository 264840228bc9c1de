"""The HTTP service: endpoints (service.py), guards, dependencies, the prediction path, the batcher,
settings, metrics. Imports storage/ and models/; nothing of the project imports it but tests/ and loadtests/."""
