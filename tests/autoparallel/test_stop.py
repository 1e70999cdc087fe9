"""ap.StopRequest: durations, signals, the time budget and periodic saves, in one process (DDP in tests/distributed)."""
from __future__ import annotations

import os
import signal
import sys

import pytest

import autoparallel as ap

stop_module = sys.modules["autoparallel.stop"]


@pytest.mark.parametrize(("text", "seconds"), [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("3600", 3600),
                                               (7200, 7200), ("1.5h", 5400), ("1d", 86400), (" 2m 30s ", 150)])
def test_durations(text, seconds):
    assert ap.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5", "10x", "", "h"])
def test_bad_durations_name_the_value_and_the_forms(text):
    with pytest.raises(ap.UsageError, match=r"--time-budget .* is not a duration: use e.g. 11h30m, 90m, 45s"):
        ap.parse_duration(text, "--time-budget")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(stop_module.time, "monotonic", fake)
    return fake


def test_the_time_budget_stops_at_the_first_check_after_it(clock):
    with ap.StopRequest(time_budget="90m") as stop:
        clock.now += 89 * 60
        assert stop.should_stop() is False
        clock.now += 60
        assert stop.should_stop() is True
        assert stop.should_stop() is True  # stays stopped
    assert stop.agreed == "time budget of 5400 s reached"


def save_due_at_each_check(clock, checks: int) -> list[bool]:
    """``save_due`` after each of ``checks`` checks four minutes apart, with a save every 10 minutes."""
    with ap.StopRequest(save_every="10m") as stop:
        flags = []
        for _ in range(checks):
            clock.now += 4 * 60
            stop.should_stop()
            flags.append(stop.save_due)
    return flags


def test_periodic_saves_fall_due_once_per_interval(clock):
    # At 12 and 24 minutes: the interval restarts at a save.
    assert save_due_at_each_check(clock, 6) == [False, False, True, False, False, True]


@pytest.mark.usefixtures("single_process_group")
def test_under_ddp_periodic_saves_fall_due_once_per_interval_one_check_later(clock, monkeypatch):
    # The distributed path (an all-reduce that each check sends and the next one reads), in a 1-rank group.
    monkeypatch.setattr(stop_module.group, "is_distributed", lambda: True)
    # Due at 12 min, agreed at the next check (16); the interval restarts there: due at 28, agreed at 32.
    assert save_due_at_each_check(clock, 9) == [False, False, False, True, False, False, False, True, False]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_asks_for_a_stop_that_the_next_check_agrees_on(name):
    with ap.StopRequest() as stop:
        assert stop.should_stop() is False
        os.kill(os.getpid(), getattr(signal, name))
        assert stop.reason == name
        assert stop.should_stop() is True
    assert signal.getsignal(getattr(signal, name)) is not stop._handle  # handlers restored


def test_a_second_ctrl_c_interrupts_at_once():
    with ap.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_the_stop_is_reported_to_a_launching_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPARALLEL_STOP_FILE", str(tmp_path / "stopped"))
    with ap.StopRequest() as stop:
        stop.request("early stopping")
        assert stop.should_stop() is True
    assert (tmp_path / "stopped").read_text() == "early stopping"
