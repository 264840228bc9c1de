"""The work of the /jobs endpoints (docs/api.md, Bulk jobs): submit, progress, results, cancel,
each for the holder of the job's token (or the admin). The queue, the runner and the body's
parsing are service/jobs.py's and storage/jobs.py's."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import Request, Response

from service import schemas
from service.clients import ClientLimits, job_token
from service.config import Settings
from service.database import DatabaseCalls
from service.errors import ApiError
from service.job_results import ResultsStream, results_ndjson
from service.job_uploads import JobBody, new_token, read_job_body
from storage.jobs import JobQueue, QuotaExceeded, Quotas

# Job results sent per database read: about a millisecond to read and encode.
RESULTS_PAGE = 250
# A refused submission's Retry-After: a job's chunks take seconds to minutes, a retry sooner
# would find the same queue.
JOB_RETRY_AFTER_S = 30


class JobApi:
    """The /jobs endpoints of one worker, on its job queue, database threads and client limits;
    jobs are submitted under the model tag `model`."""

    def __init__(
        self, queue: JobQueue, database: DatabaseCalls, limits: ClientLimits, model: str, settings: Settings
    ) -> None:
        self.queue = queue
        self.database = database
        self.limits = limits
        self.model = model
        self.settings = settings
        self.quotas = Quotas(
            settings.max_active_jobs_per_client, settings.max_queued_texts_per_client, settings.max_queued_texts
        )

    async def submit(self, request: Request, response: Response) -> schemas.JobSubmitted:
        await self.limits.check(request, response, "jobs")
        settings = self.settings
        body = JobBody(
            request.headers.get("content-type", ""),
            settings.max_job_texts,
            settings.max_text_chars,
            settings.max_job_body_bytes,
        )
        client = self.limits.identity(request)
        token, digest = new_token()
        try:
            await self.database.run(self.queue.check_quotas, client, self.quotas)  # before the body
            texts = await read_job_body(request, body, settings.job_upload_timeout_seconds)
            job_id = await self.database.run(
                self.queue.submit, texts, self.model, client, digest, self.quotas, timeout_s=120
            )
        except QuotaExceeded as exc:
            status = 429 if exc.per_client else 503
            raise ApiError(status, f"job refused: {exc}", {"Retry-After": str(JOB_RETRY_AFTER_S)}) from None
        finally:
            body.texts.close()
        response.headers["Location"] = f"/jobs/{job_id}"
        return schemas.JobSubmitted(job_id=job_id, status="queued", total=len(texts), token=token)

    async def progress(self, job_id: str, request: Request, response: Response) -> dict[str, Any]:
        """The job's progress; 404 for anyone but its token's holder and the admin."""
        await self.limits.check(request, response, "job_reads")
        progress = await self.database.run(self.queue.status, job_id, job_token(request))
        if progress is None:
            raise ApiError(404, f"unknown job {job_id}")
        return dict(progress)

    async def results(self, job_id: str, request: Request, response: Response) -> ResultsStream:
        progress = await self.progress(job_id, request, response)
        if progress["status"] != "done":
            raise ApiError(409, f"job {job_id} is {progress['status']}: results once it is done", progress=progress)
        page = functools.partial(self.database.run, results_ndjson, self.queue, job_id)
        return ResultsStream(
            lambda after: page(after, RESULTS_PAGE), RESULTS_PAGE, self.settings.job_send_timeout_seconds
        )

    async def cancel(self, job_id: str, request: Request, response: Response) -> dict[str, Any]:
        await self.limits.check(request, response, "job_reads")
        status, cancelled = await self.database.run(self.queue.cancel, job_id, job_token(request))
        if status is None:
            raise ApiError(404, f"unknown job {job_id}")
        if not cancelled:
            raise ApiError(409, f"job {job_id} is already {status}")
        return {"job_id": job_id, "status": status}
