"""Stop a training loop at its first non-finite loss, naming the option to change.

Issue 24: FixMatch (SPICE-Semi) on MNIST pixels logged ``loss=nan`` from step 39, ran all
2,000 steps and only then failed, losing the whole run. A loop calls :func:`check_finite`
on each step's loss (one device sync per step, which every loop here already pays to log
the loss); the :class:`NonFiniteLoss` it raises carries the stage, the step, and the option
and value to change, so a caller with an earlier good result (SPICE keeps SPICE-Self) can
fall back to it and record why (``history_["fallbacks"]`` -> run.json and the report).
"""

from __future__ import annotations

import math
from typing import Any

from imgclust.errors import InputError


class NonFiniteLoss(InputError):
    """A training loss became NaN or inf; ``option``/``value`` name what to lower."""

    def __init__(self, stage: str, step: int, value: float, option: str, option_value: Any) -> None:
        self.stage, self.step, self.value, self.option, self.option_value = stage, step, value, option, option_value
        super().__init__(f"{stage}: the loss became non-finite ({value}) at step {step}; "
                         f"lower {option} (now {option_value})")

    def as_record(self, kept: str) -> dict[str, Any]:
        """What run.json's ``fallbacks`` holds: the failed stage, why, and the result kept instead."""
        return {"stage": self.stage, "kept": kept, "step": self.step, "option": self.option,
                "option_value": self.option_value, "message": str(self)}


def check_finite(loss: Any, *, stage: str, step: int, option: str, option_value: Any) -> float:
    """``float(loss)``; raises :class:`NonFiniteLoss` at once when it is NaN or inf."""
    v = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(v):
        raise NonFiniteLoss(stage, step, v, option, option_value)
    return v


__all__ = ["NonFiniteLoss", "check_finite"]
