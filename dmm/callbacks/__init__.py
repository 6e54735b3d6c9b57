"""Lightning callbacks: the evaluation that runs any measure, the training-time dynamics, exact resumes."""

from dmm.callbacks.checkpoint import Checkpoint
from dmm.callbacks.dynamics import ManifoldDynamics
from dmm.callbacks.evaluation import Evaluation
from dmm.callbacks.resume import RNGState
from dmm.callbacks.shards import ShardWriter

__all__ = ["Checkpoint", "Evaluation", "ManifoldDynamics", "RNGState", "ShardWriter"]
