"""Request and response bodies of the HTTP contract (shared/API.md)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from service.config import get_settings

Label = Literal["negative", "positive"]


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
