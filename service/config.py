"""Every setting of the service, from the environment, in one place (see the README's table)."""

from __future__ import annotations

import ipaddress
import tomllib
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode

from models import cpus
from storage import db

# The best of `make bench`'s knob table on 2 cores (docs/performance.md; docs/decisions.md, "Sized
# by the CPUs the instance may use").
DEFAULT_WORKERS = 2
# The CPUs this instance may use (affinity and cgroup quota, models/cpus.py): never more workers
# than CPUs, and the threads below share these out, not the host's cores.
CPUS = cpus.available()
DEFAULT_BATCH_MAX_TEXTS = 32
DEFAULT_BATCH_WAIT_MS = 0.0
# Room, within the spike's p99 target of 350 ms, for one full batch's forward call and HTTP
# (docs/performance.md).
DEFAULT_MAX_QUEUE_DELAY_MS = 200.0
DEFAULT_SPILL_MAX_BYTES = 1 << 30
# An analytics key anyone could guess is refused at start: too short, or an example's value.
MIN_ADMIN_KEY_CHARS = 32
PLACEHOLDER_WORDS = ("change-me", "changeme", "replace-me", "placeholder", "example", "your-key")
# Relative paths (the SQLite file, the spill folder) are anchored here, beside service/.
PROJECT_ROOT = db.PROJECT_ROOT


class Settings(db.DatabaseSettings):
    """The contract's configuration variables (docs/api.md), typed and with defaults; the
    database's (DATABASE_URL, DATABASE_PASSWORD) and where they are read from are
    storage.db.DatabaseSettings'."""

    redis_url: str | None = None
    # Kept out of REDIS_URL: from the environment or, as compose and Kubernetes mount it, the
    # file redis_password in SECRETS_DIR (/run/secrets), as every other setting may be.
    redis_password: SecretStr | None = None
    # PostgreSQL connections each of a worker's two engines (analytics, jobs) keeps, and may open
    # beyond them: a replica holds up to workers x 2 x (size + overflow) (deploy/k8s/configmap.yaml).
    database_pool_size: int = Field(5, gt=0)
    database_max_overflow: int = Field(5, ge=0)
    # The ONNX Runtime int8 export serves by default; the PyTorch fp32 model it was exported
    # from is variant B, the reference the A/B test measures it against.
    sentiment_model: str = "sentiment-minilm-int8:latest"
    ab_model_b: str = "sentiment-minilm:latest"
    ab_split: float = Field(0.5, ge=0.0, le=1.0)
    cache_ttl_seconds: int = Field(86400, gt=0)
    # A limits-style string ("100/minute", "10 per second"), or "0" to switch the limit off.
    rate_limit_predict: str = "100/minute"
    rate_limit_batch: str = "20/minute"
    rate_limit_jobs: str = "10/minute"
    # GET /jobs/{id}, its results and DELETE, per client: a poll every second fits.
    rate_limit_job_reads: str = "120/minute"
    trusted_proxies: Annotated[list[str], NoDecode] = []
    admin_api_key: SecretStr | None = None
    # The key of the request ids /feedback accepts (service/request_ids.py). Unset: derived from
    # ADMIN_API_KEY, or, without one, a key file in SPILL_DIR shared by the instance's workers.
    request_id_key: SecretStr | None = None
    max_text_chars: int = Field(5000, gt=0)
    max_batch_size: int = Field(64, gt=0)
    max_body_bytes: int = Field(1_048_576, gt=0)
    # Bulk jobs (/jobs): their own size limits, and how long a finished job's results are kept.
    max_job_texts: int = Field(100_000, gt=0)
    max_job_body_bytes: int = Field(64 * 1_048_576, gt=0)
    job_result_ttl_seconds: int = Field(604_800, gt=0)
    # Queued work: per client (429 over it) and for every client together (503), so the texts
    # waiting in the database are bounded (docs/api.md, "Bulk jobs: ownership, quotas, failures").
    max_active_jobs_per_client: int = Field(5, gt=0)
    max_queued_texts_per_client: int = Field(200_000, gt=0)
    max_queued_texts: int = Field(1_000_000, gt=0)
    # A chunk whose scoring fails (or whose worker dies) this many times fails its job.
    job_max_attempts: int = Field(3, gt=0)
    # A job whose model no worker of this instance serves, and that no worker advanced for this
    # long, fails (replicas still serving its model during an upgrade take it meanwhile).
    job_unserved_seconds: float = Field(600.0, gt=0)
    # A job body must arrive within this long (408 otherwise): a trickled upload holds a slot.
    job_upload_timeout_seconds: float = Field(120.0, gt=0)
    # A results reader that takes no bytes for this long is cut off, freeing its slot.
    job_send_timeout_seconds: float = Field(30.0, gt=0)
    # The kernel's send buffer of each connection (Linux doubles the value; 0 keeps its
    # autotuning, up to 4 MiB): what an unread response may take of a worker's work and memory
    # before a send blocks and the send timeout counts (guards.cap_send_buffers).
    socket_send_buffer_bytes: int = Field(32_768, ge=0)
    # /jobs requests a worker serves at once, apart from the prediction endpoints' limit, and
    # of those at most JOB_REQUESTS_PER_CLIENT from one client (429 beyond).
    max_job_requests_in_flight: int = Field(32, gt=0)
    job_requests_per_client: int = Field(4, gt=0)
    # A leased chunk (256 texts, about half a second of an idle worker) whose worker has not
    # renewed its lease in this time is taken by another: a dead worker's chunk waits at most this
    # long. A live worker renews it every third of it, waiting or scoring (service/jobs.py).
    job_lease_seconds: float = Field(30.0, gt=0)
    # A job's sub-batch starts only after the instance has served no interactive prediction for
    # this long (service/activity.py): 0 runs jobs beside interactive traffic, at the lowest CPU
    # priority but slowing it (docs/performance.md, Bulk jobs beside interactive traffic).
    job_quiet_ms: float = Field(50.0, ge=0)
    service_workers: int = Field(min(DEFAULT_WORKERS, CPUS.cpus), gt=0)
    torch_num_threads: int | None = Field(None, gt=0)
    inference_threads: int | None = Field(None, gt=0)
    torch_num_interop_threads: int = Field(1, gt=0)
    store_text: bool = False
    # The in-process batcher (service/batching.py); defaults measured with `make bench`.
    batch_max_texts: int = Field(DEFAULT_BATCH_MAX_TEXTS, gt=0)
    batch_wait_ms: float = Field(DEFAULT_BATCH_WAIT_MS, ge=0)
    max_queue_delay_ms: float = Field(DEFAULT_MAX_QUEUE_DELAY_MS, gt=0)
    access_log: bool = False
    # Where analytics rows go while the database is down; replayed when it is back. Keep it
    # on a persistent volume in containers so a restart during an outage loses nothing.
    spill_dir: str = "var/spill"
    # The cap of that folder (every worker's log): about 3.5 million rows of 300 bytes, 1.5 hours
    # of this host's top uncached rate (600 predictions/s) with the database down. Beyond it rows
    # are dropped and counted (sentiment_analytics_rows_total{outcome="dropped"}, alerted on).
    spill_max_bytes: int = Field(DEFAULT_SPILL_MAX_BYTES, gt=0)

    @field_validator("admin_api_key", "request_id_key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Keys anyone could guess are refused at start: the admin key, and the key that signs
        the request ids /feedback takes (a guessed one lets anyone skew the A/B accuracy)."""
        if value is None:
            return None
        name, key = str(info.field_name).upper(), value.get_secret_value()
        if len(key) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(f"{name} must be at least {MIN_ADMIN_KEY_CHARS} characters (openssl rand -hex 32)")
        if any(word in key.lower().replace("_", "-") for word in PLACEHOLDER_WORDS):
            raise ValueError(f"{name} is a placeholder; generate one with openssl rand -hex 32")
        return value

    @model_validator(mode="after")
    def _password_into_redis_url(self) -> Settings:
        if self.redis_url and self.redis_password:
            self.redis_url = db.with_password(self.redis_url, self.redis_password.get_secret_value())
        return self

    @field_validator("spill_dir")
    @classmethod
    def _anchor_spill_dir(cls, value: str) -> str:
        path = Path(value)
        return value if path.is_absolute() else str(PROJECT_ROOT / path)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @property
    def inference_threads_per_worker(self) -> int:
        """Forward calls a worker runs at once: by default the cores shared out between workers."""
        return self.inference_threads or max(1, CPUS.cpus // self.service_workers)

    @property
    def threads_per_worker(self) -> int:
        """Intra-op threads of each forward call: by default what is left of the cores."""
        if self.torch_num_threads:
            return self.torch_num_threads
        return max(1, CPUS.cpus // (self.service_workers * self.inference_threads_per_worker))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.load()


def project_version() -> str:
    """The project's version: installed metadata, or pyproject.toml inside a Bento."""
    try:
        return package_version("sentiment-service")
    except PackageNotFoundError:
        return str(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"])
