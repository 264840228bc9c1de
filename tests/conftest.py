"""Shared fixtures. The BentoML home is a fresh folder per test session, set before anything
imports bentoml, so tests never read or write the user's model store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The user's store, where `make model` puts the full models (the container tests look there).
USER_BENTOML_HOME = os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))
_HOME = Path(tempfile.mkdtemp(prefix="sentiment-tests-bentoml-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The environment every test starts from: a test that sets settings puts them back after it.
ENVIRON_AT_START = dict(os.environ)

import pytest  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
# The downloaded source packages are cached between runs (they are pinned by hash).
DATA_DIR = PROJECT / "var" / "data"


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def quick_models(bentoml_home: Path) -> list[str]:
    """Both models built with the quick profile into this session's model store."""
    from models.build import build

    return build("quick", DATA_DIR)


@pytest.fixture(scope="session")
def model_env(quick_models: list[str]) -> dict[str, str]:
    """The quick models as the service serves them by default: the ONNX int8 export as A (and
    /predict, /batch), the PyTorch fp32 model it came from as B."""
    fp32, int8 = quick_models
    return {"SENTIMENT_MODEL": int8, "AB_MODEL_B": fp32}
