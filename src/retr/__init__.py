"""retr: sequential recommendation with the Recommender Transformer (RETR) and pathway attention.

The public API: one estimator per model (``retr.RETRModel``, ``retr.SASRecModel``, ...,
``retr.SequentialModel`` for any of them) that ``fit``s on a DataFrame of interactions,
``evaluate``s, ``recommend``s, ``save``s and ``retr.load``s; and the functions the CLI and the
benchmarks run (``retr.train``, ``retr.load_run``, ``retr.evaluate``, ``retr.train_epoch``,
``retr.build_model``) with the pieces underneath them: reading a log
(``retr.read_interactions``), splitting it (``retr.make_split``), the sampled protocol's
negatives (``retr.sample_negatives``), users' next-item states and top-k lists
(``retr.user_states``, ``retr.top_k``), the training losses (``retr.compute_loss``), the
route statistics and the deletion test of explanations (``retr.route_statistics``,
``retr.deletion_test``), and the HTTP app of ``retr serve`` (``retr.create_app``; it needs the
``serve`` extra only when called).
"""

__version__ = "0.1.0"

# the version first: modules below read it while this package initialises
from retr.config import RunConfig, resolve_config  # noqa: E402
from retr.data.dataset import SequenceDataset, Vocabulary  # noqa: E402
from retr.data.load import dataset_from_frame, load_dataset  # noqa: E402
from retr.data.negatives import sample_negatives  # noqa: E402
from retr.data.readers import read_interactions  # noqa: E402
from retr.data.splits import make_split  # noqa: E402
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
from retr.evaluation.ranking import top_k, user_states  # noqa: E402
from retr.evaluation.routes import route_statistics  # noqa: E402
from retr.explain.deletion import METHODS as DELETION_METHODS  # noqa: E402
from retr.explain.deletion import deletion_test  # noqa: E402
from retr.models import build_model, build_run_model  # noqa: E402
from retr.runs import load_config, load_run, train  # noqa: E402
from retr.serving.http import create_app  # noqa: E402  (imports fastapi only when called)
from retr.serving.recommender import Recommender  # noqa: E402
from retr.text import transfer as _text_items  # noqa: E402,F401  (registers item_repr "text")
from retr.training.losses import compute_loss  # noqa: E402
from retr.training.trainer import EpochStats, train_epoch  # noqa: E402

__all__ = [
    "BERT4RecModel", "ConfigError", "DELETION_METHODS", "DataError", "EpochStats", "GRU4RecModel", "PopModel",
    "RETRModel", "Recommender", "RetrError", "RunConfig", "RunDirError", "SASRecModel",
    "SequenceDataset", "SequentialModel", "Vocabulary", "__version__", "build_model",
    "build_run_model", "compute_loss", "create_app", "dataset_from_frame", "deletion_test",
    "evaluate", "load",
    "load_config", "load_dataset", "load_run", "make_split", "read_interactions", "resolve_config",
    "route_statistics",
    "sample_negatives", "synthetic_interactions", "top_k", "train", "train_epoch", "user_states",
]
