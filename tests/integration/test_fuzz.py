"""schemathesis over the published OpenAPI document (/docs.json) of a real `bentoml serve`: the
public operations get generated valid and invalid requests; no answer may be a 5xx other than a
documented 503, and every answer must match its documented status codes, headers and schema."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import GenerationMode

from tests.support.serving import Served, embedded_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The contract's operations; BentoML's own probes and /metrics are not this service's API.
PUBLIC = (
    r"^/(predict|predict/ab|batch|feedback|analytics/summary|analytics/ab|health"
    r"|jobs|jobs/\{job_id\}|jobs/\{job_id\}/results)$"
)
EXAMPLES = 25  # per operation and mode (valid, invalid): a few hundred requests in all


@pytest.fixture(scope="module")
def fuzzed(model_env: dict[str, str], bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("fuzz")
    # limits off: generated requests must reach validation and the model, not a 429
    env = embedded_env(bentoml_home, model_env, workdir, RATE_LIMIT_PREDICT="0", RATE_LIMIT_BATCH="0")
    with Served(env, workdir / "serve.log", workers=1) as server:
        yield server.url


def fuzz(url: str, examples: int = EXAMPLES) -> Counter[str]:
    """Every public operation, valid and invalid requests, each answer validated (raises on the
    first failure); returns the cases run per operation and mode."""
    schema = schemathesis.openapi.from_url(f"{url}/docs.json").include(path_regex=PUBLIC)
    ran: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_one(
                    url, operation.as_strategy(generation_mode=mode), examples, ran, f"{operation.label} {mode.value}"
                )
            except Unsatisfiable:
                # GET /health takes no input at all: there is no invalid request to make
                assert mode is GenerationMode.NEGATIVE and not list(operation.iter_parameters()), operation.label
    return ran


def _fuzz_one(url: str, cases: SearchStrategy, examples: int, ran: Counter[str], key: str) -> None:
    @given(case=cases)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=url)
        assert response.status_code < 500 or response.status_code == 503, response.text
        ran[key] += 1

    run()


def test_every_answer_matches_the_published_contract(fuzzed: str) -> None:
    ran = fuzz(fuzzed)
    operations = {key.rsplit(" ", 1)[0] for key in ran}
    print(f"schemathesis: {len(operations)} operations, {sum(ran.values())} cases, 0 failures: {dict(ran)}")
    assert len(operations) == 11, sorted(operations)
