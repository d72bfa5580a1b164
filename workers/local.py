"""The in-process executor: a search plan's requests run one at a time in this process.

The same :class:`workers.request.Plan` protocol as the Ray executor, with no Ray: unit tests
run a whole plan (stages, budget, recording, resume) through it, and a user without Ray can run
a small search. Failed attempts are retried up to ``max_failures`` times, and ASHA stops
training between epochs, as on Ray.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from workers.request import FINISH, Asha, Plan, TrialError, run_request

__all__ = ["run_local"]


def run_local(plan: Plan, data: Any, *, max_failures: int = 2, asha_max_t: int | None = None,
              max_waits: int = 100) -> int:
    """Run ``plan`` here until it says FINISH; returns the number of attempts made.

    Nothing runs beside a trial, so a plan that answers WAIT with no trial running is asked again
    (it may be waiting on its own clock) at most ``max_waits`` times in a row, then ended."""
    attempts = waits = 0
    judge = Asha(asha_max_t) if asha_max_t else None
    while True:
        what = plan.next(0)
        if what == FINISH:
            return attempts
        if isinstance(what, str):
            waits += 1
            if waits > max_waits:
                return attempts
            time.sleep(0.01)
            continue
        waits = 0
        for attempt in range(max_failures + 1):
            plan.started(what, attempt)
            attempts += 1
            t0 = time.perf_counter()
            try:
                report = None
                if what.asha and judge is not None:
                    def report(m: dict[str, Any], key: str = what.key) -> bool:
                        return judge.report(key, int(m["asha_epoch"]), float(m["accuracy"]))
                result = run_request(what, data, report=report)
            except Exception:
                final = attempt >= max_failures
                plan.failed(TrialError(what, traceback.format_exc(limit=8)[-8000:], time.perf_counter() - t0,
                                       attempt, final))
                if final:
                    break
                continue
            result.attempt = attempt
            plan.finished(result)
            break
