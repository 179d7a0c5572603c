"""retr: sequential recommendation with the Recommender Transformer (RETR) and pathway attention."""

from retr.errors import ConfigError, DataError, RetrError, RunDirError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "RetrError", "RunDirError", "__version__"]
