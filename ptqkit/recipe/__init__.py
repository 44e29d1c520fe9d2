"""An accuracy-driven recipe: :func:`tune` tries the candidate recipes (:data:`CANDIDATES`) on
held-out calibration samples, scored against the float model (no labels), within a time budget,
and returns the best quantized model with every trial recorded in its ``ptq_info``."""

from .candidates import CANDIDATES, Candidate
from .holdout import RANKINGS
from .search import tune

__all__ = ["CANDIDATES", "RANKINGS", "Candidate", "tune"]
