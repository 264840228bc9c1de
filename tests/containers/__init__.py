"""The image and the air-gapped stack on a Docker engine (`make test-containers`, marker `containers`).
Imports tests/support."""
