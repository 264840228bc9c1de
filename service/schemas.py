"""Request and response bodies of the HTTP contract (docs/api.md), and its query parameters."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from pydantic.json_schema import JsonDict

from service.config import get_settings
from service.errors import ApiError

Label = Literal["negative", "positive"]
# The analytics `window`: a number and a unit, as many digits as keep it under 10,000 days (any
# more would reach back past the dates a timestamp holds). The OpenAPI document publishes it.
WINDOW_PATTERN = r"^(\d{1,6}[sm]|\d{1,5}h|\d{1,4}d)$"
WINDOW_QUERY = {"pattern": WINDOW_PATTERN, "examples": ["15m", "1h", "24h"]}


def parse_window(value: str) -> timedelta:
    """The analytics `window` query parameter: a number and a unit s, m, h or d (e.g. 15m)."""
    match = re.fullmatch(r"(\d{1,6}[sm]|\d{1,5}h|\d{1,4}d)", value)
    if not match:
        raise ApiError(
            400,
            "invalid request: window: expected a number and a unit s, m, h or d, e.g. 15m"
            " (at most 6 digits of s or m, 5 of h, 4 of d)",
        )
    seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
    return timedelta(seconds=seconds)


def check_text(value: str) -> str:
    try:
        if not value.isascii():  # ASCII holds no surrogates: skip the copy (a job checks 100,000)
            value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    if "\x00" in value:
        # PostgreSQL cannot store it, and it is never part of a review: refused at the door.
        raise ValueError("must not contain NUL characters (\\u0000)")
    stripped = value.strip()
    if not stripped:
        raise ValueError("must not be blank")
    limit = get_settings().max_text_chars
    if len(stripped) > limit:
        raise ValueError(f"must be at most {limit} characters after stripping, got {len(stripped)}")
    return stripped


# What a valid text is, published in the OpenAPI document (checked by check_text, whose
# messages name the problem): not blank, no NUL, at most MAX_TEXT_CHARS after stripping (said in
# words: a maxLength would count the surrounding whitespace that the limit does not).
# The whitespace is spelled out: what str.strip() removes is not what every regex engine's \s
# means (ECMAScript's leaves out U+001C-U+001F and U+0085, and adds U+FEFF).
STRIPPED = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_SCHEMA: JsonDict = {
    "type": "string",
    "minLength": 1,
    "pattern": rf"^[^\x00]*[^\x00{STRIPPED}][^\x00]*$",
    "description": f"not blank, no NUL, at most {get_settings().max_text_chars} characters after stripping",
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(json_schema_extra=TEXT_SCHEMA)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return check_text(value)


class ABRequest(PredictRequest):
    user_id: StrictStr | None = Field(None, max_length=256)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(
        json_schema_extra={"minItems": 1, "maxItems": get_settings().max_batch_size, "items": TEXT_SCHEMA}
    )

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        limit = get_settings().max_batch_size
        if not 1 <= len(value) <= limit:
            raise ValueError(f"must hold 1 to {limit} texts, got {len(value)}")
        out = []
        for i, text in enumerate(value):
            try:
                out.append(check_text(text))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return out


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: uuid.UUID
    label: Label


class Prediction(BaseModel):
    request_id: str
    label: Label
    score: float
    probabilities: dict[str, float]
    model: str
    cached: bool
    latency_ms: float


class ABPrediction(Prediction):
    variant: Literal["A", "B"]
    experiment: str


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    count: int
    cached_count: int


class FeedbackResponse(BaseModel):
    accepted: bool = True


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, and the request id the log has it under."""

    error: str
    request_id: str | None = None
    fields: list[FieldError] | None = None


_MEANINGS = {
    400: "invalid body or query, naming the field",
    401: "analytics need Authorization: Bearer <ADMIN_API_KEY>",
    404: "unknown request_id (feedback takes only ids this service issued), or unknown job"
    " (or its token missing or not its own: Authorization: Bearer <token>)",
    408: "the job body did not arrive within JOB_UPLOAD_TIMEOUT_SECONDS",
    413: "request body over MAX_BODY_BYTES (MAX_JOB_BODY_BYTES for /jobs)",
    409: "the job is not done (the body has its progress), or already finished (DELETE)",
    429: "over the client's rate limit (Retry-After, RateLimit and RateLimit-Policy headers),"
    " or its job quota (Retry-After)",
    503: "overloaded, or the analytics database unavailable: retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    """The error answers a route gives, for the OpenAPI document. "4XX" covers the rest (405 for
    a wrong method), and keeps FastAPI from listing a 422 that this service never sends."""
    out: dict[int | str, dict] = {code: {"model": ErrorBody, "description": _MEANINGS[code]} for code in codes}
    out["4XX"] = {"model": ErrorBody, "description": "any other client error, with the same body"}
    return out


def openapi_errors(*codes: int) -> dict[str, dict]:
    """error_responses as an OpenAPI document lists them, for the routes FastAPI does not
    describe (the @bentoml.api methods): ErrorBody by reference."""
    body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    out = {str(code): {"description": _MEANINGS[code], **body} for code in codes}
    out["4XX"] = {"description": "any other client error, with the same body", **body}
    return out


JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class JobSubmitted(BaseModel):
    job_id: str
    status: JobStatus
    total: int
    # Given once: send it as `Authorization: Bearer <token>` to read or cancel the job.
    token: str


class JobProgress(BaseModel):
    job_id: str
    status: JobStatus
    total: int
    done: int
    created_at: str
    finished_at: str | None
    eta_seconds: float | None
    model: str
    # Why a failed job failed (JOB_MAX_ATTEMPTS, or its model no longer served); else null.
    error: str | None = None


# POST /jobs reads its body itself (two media types, up to MAX_JOB_BODY_BYTES): its OpenAPI
# request body is declared here.
JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"texts": {"type": "array", "minItems": 1, "items": TEXT_SCHEMA}},
                    "required": ["texts"],
                    "additionalProperties": False,
                }
            },
        },
        # NDJSON (application/x-ndjson, one {"text": str} a line) is taken too; a JSON schema
        # cannot say what a valid one is, so it is described rather than published as a type.
        "description": 'JSON {"texts": [...]}, or application/x-ndjson with one {"text": str} a line',
    }
}

NDJSON_RESULTS = {
    "description": 'one {"index", "label", "score", "probabilities"} a line, in input order',
    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
}
