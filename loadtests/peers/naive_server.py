"""The naive peer: one PyTorch fp32 forward per request, no batching, no cache. Starlette on
uvicorn with 2 worker processes of 1 torch thread each; transformers' tokenizer and model
straight from the store's fp32 folder.

    python -m loadtests.peers.naive_server --model sentiment-minilm:latest --port 8002
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def build_app() -> Starlette:
    import bentoml
    import torch
    from transformers import AutoTokenizer

    from models.classifier import load_classifier
    from models.runtime import read_info

    torch.set_num_threads(1)
    folder = bentoml.models.get(os.environ["PEER_MODEL"]).path
    info = read_info(Path(folder))
    max_length, temperature = int(info["max_length"]), float(info.get("temperature", 1.0))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_classifier(Path(folder)).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def forward(text: str) -> dict:
        with torch.inference_mode():
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            probs = (model(**enc).logits / temperature).softmax(-1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": labels[best], "score": probs[best], "probabilities": dict(zip(labels, probs, strict=True))}

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await run_in_threadpool(forward, body["text"]))

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentiment-minilm:latest")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ["PEER_MODEL"] = args.model
    uvicorn.run(
        "loadtests.peers.naive_server:build_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
