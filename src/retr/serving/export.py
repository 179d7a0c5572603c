"""ONNX export of the scoring path, checked against PyTorch with onnxruntime.

The exported graph takes ``seqs`` int64 [B, max_len] (left-padded internal ids, 0 = padding;
map external ids with the run's ``vocab.json``: item ``items[i]`` has id ``i + 1``) and returns
``scores`` float32 [B, n_items + 1] over every item (column 0 is padding and scores -inf) and
``user_state`` float32 [B, d]. History exclusion and top-k stay outside the graph, so any
runtime can apply them. Routes are the deterministic inference routes; a model whose routes are
random at inference (router="random" or inference_route="sample") cannot be exported.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retr.errors import RetrError
from retr.models.base import SequentialRecommender
from retr.models.pathway import PathwayRouter
from retr.serving.recommender import Recommender

RTOL = 1e-4  # tolerance: max |onnx - torch| <= RTOL * max(1, max |torch score|)
OPSET = 18


class ExportError(RetrError):
    """The model cannot be exported, or the exported graph disagrees with PyTorch."""


class ScoringGraph(nn.Module):
    """seqs [B, N] -> (scores [B, n_items + 1], user_state [B, d]): what ONNX runtimes run."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("items", torch.arange(model.n_items + 1), persistent=False)

    def forward(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.user_representation(seqs)  # [B, d]
        scores = self.model.score_items(h, torch.as_tensor(self.items))  # [B, n_items + 1]
        pad = torch.full_like(scores[:, :1], float("-inf"))  # [B, 1] padding is never an item
        return torch.cat([pad, scores[:, 1:]], dim=1), h


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    tolerance: float
    passed: bool
    n_checked: int
    opset: int


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """The exporter logs progress and optional-package notices; a CLI wants one line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stochastic(model: SequentialRecommender) -> bool:
    """Whether a router of the model draws its route at inference."""
    return any(m.options.router == "random" or m.options.inference_route == "sample"
               for m in model.modules() if isinstance(m, PathwayRouter))


def sample_inputs(recommender: Recommender, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, max_len] padded histories of varied lengths (one empty, one full window)."""
    rng = np.random.default_rng(seed)
    n, n_items = recommender.max_len, recommender.n_items
    out = np.zeros((batch, n), dtype=np.int64)
    for row in range(batch):
        length = n if row == 0 else int(rng.integers(1, n + 1))
        out[row, n - length:] = rng.integers(1, n_items + 1, size=length)
    return torch.from_numpy(out)


def export_onnx(recommender: Recommender, path: str | Path, opset: int = OPSET,
                check: bool = True) -> ExportReport:
    """Export the scoring graph to ``path`` and compare it with PyTorch on sampled histories."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript onnxruntime") from None
    model = recommender.model.eval()
    if _stochastic(model):
        raise ExportError("this model samples its routes at inference (router='random' or "
                          "inference_route='sample'); its scores are random and cannot be "
                          "exported as a fixed graph")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recommender_device = recommender.device
    example = sample_inputs(recommender, 2)
    batch = torch.export.Dim("batch", min=1)
    log = io.StringIO()
    try:
        graph = ScoringGraph(model).cpu().eval()
        with warnings.catch_warnings(), redirect_stdout(log), redirect_stderr(log), _quiet_torch():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                        input_names=["seqs"],
                                        output_names=["scores", "user_state"],
                                        dynamic_shapes={"seqs": {0: batch}},
                                        external_data=False, verify=False)
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            program.save(str(path))
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types; report them as one error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of {recommender.model_name} failed: {first}") from None
    finally:
        model.to(recommender_device)
    if not check:
        return ExportReport(path, float("nan"), float("nan"), True, 0, opset)
    return check_onnx(recommender, path, opset)


def check_onnx(recommender: Recommender, path: str | Path, opset: int = OPSET,
               batch: int = 7) -> ExportReport:
    """Max |ONNX - PyTorch| over scores of ``batch`` sampled histories (another batch size)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking the export needs onnxruntime: pip install onnxruntime") from None
    path = Path(path)
    seqs = sample_inputs(recommender, batch, seed=1)
    with torch.no_grad():
        graph = ScoringGraph(recommender.model).eval().to(recommender.device)
        ref_scores, ref_state = (t.cpu().numpy() for t in graph(seqs.to(recommender.device)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_scores, got_state = session.run(["scores", "user_state"], {"seqs": seqs.numpy()})
    real = np.s_[:, 1:]  # column 0 is -inf on both sides
    diff = max(float(np.abs(got_scores[real] - ref_scores[real]).max()),
               float(np.abs(got_state - ref_state).max()))
    tolerance = RTOL * max(1.0, float(np.abs(ref_scores[real]).max()))
    return ExportReport(path, diff, tolerance, bool(diff <= tolerance), batch, opset)
