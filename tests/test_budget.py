"""Budget grammar: device-seconds or trials, one-line errors for anything else."""

from __future__ import annotations

import pytest

from nas.budget import Budget, BudgetError, parse_budget


@pytest.mark.parametrize("text, seconds, trials, device, shown", [
    ("8gpu-h", 8 * 3600, None, "gpu", "8gpu-h"),
    ("30gpu-m", 1800, None, "gpu", "30gpu-m"),
    ("2cpu-h", 7200, None, "cpu", "2cpu-h"),
    ("90s", 90, None, None, "1.5m"),
    ("2h", 7200, None, None, "2h"),
    ("1.5gpu-h", 5400, None, "gpu", "1.5gpu-h"),
    ("3cpu-m", 180, None, "cpu", "3cpu-m"),
    ("1d", 86400, None, None, "1d"),
    ("500trials", None, 500, None, "500trials"),
    ("1trial", None, 1, None, "1trials"),
    (" 8GPU-H ", 8 * 3600, None, "gpu", "8gpu-h"),
])
def test_valid_budgets(text: str, seconds: float | None, trials: int | None, device: str | None, shown: str) -> None:
    b = parse_budget(text)
    assert (b.seconds, b.trials, b.device) == (seconds, trials, device)
    assert str(b) == shown
    assert parse_budget(str(b)) == b
    assert Budget.from_dict(b.to_dict()) == b


@pytest.mark.parametrize("text", ["", "8", "8gpu", "gpu-h", "8tpu-h", "-2h", "0h", "0trials", "2.5trials",
                                  "8gpu-hours", "1e3s", "nan", "inf", "999999d", "2 h x", "++2h", "8gpu-h-2",
                                  "trials", "3.s", "20000000trials"])
def test_bad_budgets_are_one_line_errors(text: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    assert "\n" not in str(info.value) and str(info.value)


def test_counting_and_increments() -> None:
    b = parse_budget("8gpu-h")
    assert b.counts("cuda") and not b.counts("cpu")
    assert parse_budget("2h").counts("cpu") and parse_budget("2h").counts("cuda")
    assert b.used_fraction(seconds=3600) == pytest.approx(1 / 8)
    assert not b.exhausted(seconds=8 * 3600 - 1) and b.exhausted(seconds=8 * 3600)
    t = parse_budget("10trials")
    assert t.exhausted(trials=10) and not t.exhausted(seconds=1e9, trials=9)
    more = b + parse_budget("+2gpu-h", increment=True)
    assert more.seconds == 10 * 3600 and more.device == "gpu"
    assert (t + parse_budget("+5trials", increment=True)).trials == 15
    with pytest.raises(BudgetError, match="same unit kind"):
        b + parse_budget("5trials")
    with pytest.raises(BudgetError, match="same unit kind"):
        b + parse_budget("1cpu-h")
    with pytest.raises(BudgetError, match="starts with"):
        parse_budget("2gpu-h", increment=True)
