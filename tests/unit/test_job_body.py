"""A job's body parsed as it arrives: fed in pieces of any size, refused at the first thing over
a limit, its texts spooled to a file rather than held in memory."""

from __future__ import annotations

import json

import pytest


def _parse(body: bytes, content_type: str = "application/json", step: int = 7, **limits: int) -> list[str]:
    # imported here: service.job_uploads reads the settings, which the service tests set first
    from service.job_uploads import JobBody

    parser = JobBody(content_type, limits.get("texts", 100), limits.get("chars", 50), limits.get("bytes", 1 << 20))
    for at in range(0, len(body), step):
        parser.feed(body[at : at + step])
    return list(parser.close())


def test_texts_come_back_in_order_whatever_the_pieces() -> None:
    texts = ["plain", "line\nbreak", "ünïcödé ✓", "  padded  ", '"quoted" \\ back']
    expected = [t.strip() for t in texts]
    for step in (1, 3, 64, 10_000):
        assert _parse(json.dumps({"texts": texts}).encode(), step=step) == expected
        ndjson = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        assert _parse(ndjson, "application/x-ndjson", step=step) == expected


def test_spooled_texts_leave_memory_past_their_first_mib() -> None:
    from service.job_uploads import SpooledTexts

    texts = SpooledTexts(memory_bytes=1000)
    for i in range(500):
        texts.append(f"text number {i} with a new\nline")
    assert texts.on_disk
    assert len(texts) == 500 and list(texts)[499] == "text number 499 with a new\nline"
    assert list(texts) == list(texts)  # read again from the start
    texts.close()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "named"),
    [
        (b'{"texts": [' + b'"a",' * 200 + b'"a"]}', "application/json", 400, "MAX_JOB_TEXTS"),
        (b'{"texts": ["' + b"x" * 4000 + b'"]}', "application/json", 400, "runs past 1624 bytes"),
        (b'{"texts": [' + b" " * 4000 + b'"a"]}', "application/json", 400, "runs past"),
        (b'{"texts": [[[[["a"]]]]]}', "application/json", 400, "item 0: must be a string"),
        (b'{"texts": ["a", 1]}', "application/json", 400, "item 1: must be a string"),
        (b'{"texts": "a"}', "application/json", 400, 'expected {"texts"'),
        (b'{"other": ["a"]}', "application/json", 400, 'expected {"texts"'),
        (b'{"texts": ["a"]', "application/json", 400, "not valid JSON"),
        (b'{"text": "' + b"y" * 4000 + b'"}\n', "application/x-ndjson", 400, "line 1: a value runs past"),
        (
            b'{"text": "a"}\n{"text": ' + b"[" * 1500 + b"\n",
            "application/x-ndjson",
            400,
            'line 2: expected {"text": str}',
        ),
        (b'{"text": "a"}\n{"text": "b"\n', "application/x-ndjson", 400, "line 2: not valid JSON"),
        (b'{"text": "a"}\n{"text": "b", "x": 1}\n', "application/x-ndjson", 400, "line 2: expected"),
        (b'{"text": "a"}\n' * 101, "application/x-ndjson", 400, "MAX_JOB_TEXTS"),
    ],
)
def test_a_body_is_refused_naming_the_limit(body: bytes, content_type: str, status: int, named: str) -> None:
    from service.errors import ApiError

    with pytest.raises(ApiError) as refused:
        _parse(body, content_type, step=512)
    assert refused.value.status == status and named in refused.value.message


def test_a_body_past_its_bytes_is_a_413_as_it_arrives() -> None:
    from service.errors import ApiError
    from service.job_uploads import JobBody

    parser = JobBody("application/x-ndjson", 100, 50, 1000)
    parser.feed(b'{"text": "a"}\n' * 70)
    with pytest.raises(ApiError) as refused:
        parser.feed(b'{"text": "a"}\n' * 10)
    assert refused.value.status == 413 and "MAX_JOB_BODY_BYTES" in refused.value.message
