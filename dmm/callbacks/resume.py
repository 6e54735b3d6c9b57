"""Random-number state in checkpoints, so a resumed run continues as the uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch


class RNGState(L.Callback):
    """Saves the torch (CPU and CUDA) and Python RNG states in every checkpoint and restores them on resume.

    Dropout masks, random starts of attacks and anything else drawn from the global generators then
    continue from the same state after a restart. The data order is seeded per epoch separately
    (see :mod:`dmm.data.loading`). Everything saved is tensors, ints and tuples: loadable with
    ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
