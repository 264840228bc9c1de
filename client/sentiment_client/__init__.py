"""Client of the sentiment service: predictions, batches and bulk scoring jobs.

with SentimentClient("http://127.0.0.1:3000") as client:
    job = client.submit(texts)
    client.wait(job.job_id)
    for result in client.results(job.job_id):
        ...
"""

from sentiment_client._version import __version__
from sentiment_client.api import Job, JobStatus, Prediction, Result, SentimentClient, SentimentError

__all__ = ["Job", "JobStatus", "Prediction", "Result", "SentimentClient", "SentimentError", "__version__"]
