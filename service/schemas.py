"""Request and response bodies of the HTTP contract (docs/api.md), and its query parameters."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from service.config import get_settings
from service.errors import ApiError

Label = Literal["negative", "positive"]
MAX_WINDOW_SECONDS = 3650 * 86400


def parse_window(value: str) -> timedelta:
    """The analytics `window` query parameter: a number and a unit s, m, h or d (e.g. 15m)."""
    match = re.fullmatch(r"(\d{1,6})([smhd])", value.strip())
    if not match:
        raise ApiError(400, "invalid request: window: expected a number and a unit s, m, h or d, e.g. 15m")
    seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    if seconds > MAX_WINDOW_SECONDS:
        raise ApiError(400, f"invalid request: window: at most {MAX_WINDOW_SECONDS // 86400} days")
    return timedelta(seconds=seconds)


def _check_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    stripped = value.strip()
    if not stripped:
        raise ValueError("must not be blank")
    limit = get_settings().max_text_chars
    if len(stripped) > limit:
        raise ValueError(f"must be at most {limit} characters after stripping, got {len(stripped)}")
    return stripped


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _check_text(value)


class ABRequest(PredictRequest):
    user_id: StrictStr | None = Field(None, max_length=256)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr]

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        limit = get_settings().max_batch_size
        if not 1 <= len(value) <= limit:
            raise ValueError(f"must hold 1 to {limit} texts, got {len(value)}")
        out = []
        for i, text in enumerate(value):
            try:
                out.append(_check_text(text))
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
