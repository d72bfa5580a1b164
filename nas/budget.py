"""Search budgets: ``8gpu-h``, ``30gpu-m``, ``2cpu-h``, ``90s``, ``2h``, ``500trials``.

A time budget is counted in device-seconds actually used by trials, summed over workers: eight
GPUs busy for one hour spend ``8gpu-h``. A device-qualified budget (``gpu``/``cpu``) counts only
trials on that kind of device; a bare one (``2h``, ``90s``) counts any. A trial budget counts
finished trials. ``+2gpu-h`` is an increment (``nas resume NAME --budget +2gpu-h``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Budget", "BudgetError", "parse_budget"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_SECONDS = 10 * 365 * 86400.0  # ten device-years: anything larger is a typo
_MAX_TRIALS = 10_000_000
_TIME = re.compile(r"(?P<num>[0-9]{1,12}(?:\.[0-9]{1,12})?)(?:(?P<dev>gpu|cpu)-)?(?P<unit>[smhd])", re.ASCII)
_TRIALS = re.compile(r"(?P<num>[0-9]{1,12})trials?", re.ASCII)
_MAX_TEXT = 40  # longer than any budget anyone means; longer text is echoed cut short
_USAGE = "use e.g. 8gpu-h, 30gpu-m, 2cpu-h, 90s, 2h or 500trials"


class BudgetError(ValueError):
    """A budget string that cannot be read (one line, with the accepted forms)."""


@dataclass(frozen=True)
class Budget:
    """``seconds`` of ``device`` time ("gpu", "cpu" or None for any), or ``trials`` finished trials."""

    seconds: float | None = None
    trials: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.trials is None):
            raise BudgetError("a budget is either seconds or trials")
        if self.device not in (None, "gpu", "cpu"):
            raise BudgetError(f"budget device must be gpu, cpu or none, got {self.device!r}")
        if self.trials is not None and self.device is not None:
            raise BudgetError("a trial budget has no device")

    @property
    def kind(self) -> str:
        return "trials" if self.trials is not None else "seconds"

    def counts(self, device_kind: str) -> bool:
        """Whether time spent on a device of ``device_kind`` ("cuda"/"gpu" or "cpu") counts."""
        if self.device is None:
            return True
        return ("gpu" if device_kind in ("cuda", "gpu") else "cpu") == self.device

    def used_fraction(self, seconds: float = 0.0, trials: int = 0) -> float:
        """How much of the budget ``seconds`` device-seconds or ``trials`` finished trials use."""
        if self.trials is not None:
            return trials / self.trials
        return seconds / float(self.seconds)  # type: ignore[arg-type]

    def used_text(self, seconds: float = 0.0, trials: int = 0) -> str:
        """Used against total as ``nas studies`` and the dashboard show it (``181.2/180 cpu-s``)."""
        if self.trials is not None:
            return f"{trials}/{self.trials} trials"
        return f"{seconds:,.1f}/{self.seconds:,.0f} {self.device or 'device'}-s"

    def exhausted(self, seconds: float = 0.0, trials: int = 0) -> bool:
        return self.used_fraction(seconds, trials) >= 1.0

    def __add__(self, other: Budget) -> Budget:
        if not isinstance(other, Budget):
            return NotImplemented
        if self.kind != other.kind or (other.device is not None and other.device != self.device):
            raise BudgetError(f"cannot add {other} to a {self} budget; use the same unit kind")
        if self.trials is not None:
            return Budget(trials=self.trials + int(other.trials or 0))
        return Budget(seconds=float(self.seconds or 0) + float(other.seconds or 0), device=self.device)

    def __str__(self) -> str:
        if self.trials is not None:
            return f"{self.trials}trials"
        s = float(self.seconds or 0)
        for unit in ("d", "h", "m"):
            if s >= _UNITS[unit] and (s / _UNITS[unit]) == round(s / _UNITS[unit], 3):
                n = s / _UNITS[unit]
                break
        else:
            unit, n = "s", s
        num = f"{n:g}"
        return f"{num}{self.device}-{unit}" if self.device else f"{num}{unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "trials": self.trials, "device": self.device, "text": str(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        return cls(seconds=data.get("seconds"), trials=data.get("trials"), device=data.get("device"))


def _clip(text: str, n: int = 24) -> str:
    """``repr(text)`` cut to about ``n`` characters (long input is never echoed whole)."""
    return repr(text) if len(text) <= n else repr(text[:n]) + "…"


def parse_budget(text: str, *, increment: bool = False) -> Budget:
    """Read a budget string. With ``increment`` a leading ``+`` is required (``+2gpu-h``)."""
    if not isinstance(text, str):
        raise BudgetError(f"budget must be a string; {_USAGE}")
    if len(text) > _MAX_TEXT:
        raise BudgetError(f"budget {_clip(text)} is too long ({len(text):,} characters); {_USAGE}")
    if not text.isascii():
        raise BudgetError(f"budget {text!r} has non-ASCII characters; write digits as 0-9: {_USAGE}")
    raw = text.strip().lower().replace(" ", "")
    if increment:
        if not raw.startswith("+"):
            raise BudgetError(f"an added budget starts with '+', got {text!r}; e.g. +2gpu-h")
        raw = raw[1:]
    if not raw:
        raise BudgetError(f"empty budget; {_USAGE}")
    m = _TRIALS.fullmatch(raw)
    if m:
        n = int(m["num"])
        if not 1 <= n <= _MAX_TRIALS:
            raise BudgetError(f"budget {text!r}: trials must be between 1 and {_MAX_TRIALS:,}")
        return Budget(trials=n)
    m = _TIME.fullmatch(raw)
    if not m:
        raise BudgetError(f"cannot read budget {text!r}; {_USAGE}")
    seconds = float(m["num"]) * _UNITS[m["unit"]]
    if not math.isfinite(seconds) or seconds <= 0:
        raise BudgetError(f"budget {text!r} must be more than zero")
    if seconds > _MAX_SECONDS:
        raise BudgetError(f"budget {text!r} is more than ten device-years; check the unit")
    return Budget(seconds=seconds, device=m["dev"])
