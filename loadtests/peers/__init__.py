"""What users would run instead of this service, for `make bench` to measure side by side:
a lean batching server of the same ONNX int8 model (LitServe) and the naive server that runs
one PyTorch fp32 forward per request (Starlette). Each serves `POST /predict {"text"}` and
answers with the label, score and probabilities, and nothing else: no cache, no limits, no
analytics."""
