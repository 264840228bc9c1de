"""One-off probe (not part of the project): BentoML's batchable dispatch around the same int8 model."""

from pathlib import Path

import bentoml

from models import runtime


@bentoml.service(name="batchable-probe", workers=2, traffic={"timeout": 60})
class Probe:
    model = bentoml.models.BentoModel("sentiment-minilm-int8:latest")

    def __init__(self) -> None:
        self.predictor = runtime.load_dir(Path(self.model.path), str(self.model.tag), 1)
        runtime.warm_up(self.predictor, 64)

    @bentoml.api(route="/batch", batchable=True, max_batch_size=64, max_latency_ms=60000)
    def batch(self, texts: list[str]) -> list[dict]:
        return [
            {"label": o.label, "score": o.score, "probabilities": o.probabilities}
            for o in self.predictor.predict(texts)
        ]
