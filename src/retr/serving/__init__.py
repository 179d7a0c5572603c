"""Serving: recommendations for any history of external item ids, from Python, files or HTTP.

The HTTP app (:mod:`retr.serving.http`) and the ONNX export (:mod:`retr.serving.export`) need
optional packages (fastapi/uvicorn, onnx/onnxruntime), so they are imported on demand.
"""

from retr.serving.recommender import (
    EmptyHistoryError,
    Recommendation,
    Recommender,
    UnknownItemError,
)

__all__ = ["EmptyHistoryError", "Recommendation", "Recommender", "UnknownItemError"]
