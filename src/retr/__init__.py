"""retr: sequential recommendation with the Recommender Transformer (RETR) and pathway attention.

The public API: one estimator per model (``retr.RETRModel``, ``retr.SASRecModel``, ...,
``retr.SequentialModel`` for any of them) that ``fit``s on a DataFrame of interactions,
``evaluate``s, ``recommend``s, ``save``s and ``retr.load``s; and the functions the CLI and the
benchmarks run (``retr.train``, ``retr.load_run``, ``retr.evaluate``, ``retr.train_epoch``,
``retr.build_model``).
"""

__version__ = "0.1.0"

# the version first: modules below read it while this package initialises
from retr.config import RunConfig, resolve_config  # noqa: E402
from retr.data.dataset import SequenceDataset  # noqa: E402
from retr.data.load import dataset_from_frame, load_dataset  # noqa: E402
from retr.data.synthetic import synthetic_interactions  # noqa: E402
from retr.errors import ConfigError, DataError, RetrError, RunDirError  # noqa: E402
from retr.estimator import (  # noqa: E402
    BERT4RecModel,
    GRU4RecModel,
    PopModel,
    RETRModel,
    SASRecModel,
    SequentialModel,
    load,
)
from retr.evaluation.protocol import evaluate  # noqa: E402
from retr.models import build_model, build_run_model  # noqa: E402
from retr.runs import load_config, load_run, train  # noqa: E402
from retr.serving.recommender import Recommender  # noqa: E402
from retr.text import transfer as _text_items  # noqa: E402,F401  (registers item_repr "text")
from retr.training.trainer import EpochStats, train_epoch  # noqa: E402

__all__ = [
    "BERT4RecModel", "ConfigError", "DataError", "EpochStats", "GRU4RecModel", "PopModel",
    "RETRModel", "Recommender", "RetrError", "RunConfig", "RunDirError", "SASRecModel",
    "SequenceDataset", "SequentialModel", "__version__", "build_model", "build_run_model",
    "dataset_from_frame", "evaluate", "load", "load_config", "load_dataset", "load_run",
    "resolve_config", "synthetic_interactions", "train", "train_epoch",
]
