"""The lean batching peer: LitServe around the store's ONNX int8 model, batches of up to 32
texts with a 5 ms wait, 2 inference workers of 1 ONNX Runtime thread each (the service's own
layout on 2 cores).

    python -m loadtests.peers.litserve_server --model sentiment-minilm-int8:latest --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls


class SentimentAPI(ls.LitAPI):
    def __init__(self, tag: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tag = tag

    def setup(self, device: str) -> None:
        from models import runtime

        self.model = runtime.load(self.tag, threads=1)

    # No annotation on `request`: LitServe builds its route from it, and a postponed annotation
    # (a string) makes it a query parameter.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return str(request["text"])

    def predict(self, texts: list[str]) -> list[Any]:
        return self.model.predict(texts)

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"label": output.label, "score": output.score, "probabilities": output.probabilities}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentiment-minilm-int8:latest")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    api = SentimentAPI(args.model, max_batch_size=args.max_batch, batch_timeout=args.wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
