"""r1mega.signals.StopSignals: real signals sent to this process set should_stop and name the signal; the previous
handlers come back afterwards; a second Ctrl-C interrupts at once; outside the main thread nothing is installed."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from r1mega.signals import STOP_SIGNALS, StopSignals


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_is_recorded_and_previous_handlers_restored(sig):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopSignals() as stop:
        assert stop.installed and not stop.should_stop and stop.signal_name is None
        os.kill(os.getpid(), sig)  # the handler runs before kill() returns to Python code
        assert stop.should_stop and stop.signal_name == signal.Signals(sig).name
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first one's name
        assert stop.signal_name == signal.Signals(sig).name
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_second_ctrl_c_interrupts():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def body() -> None:
        with StopSignals() as stop:
            seen["installed"] = stop.installed
            seen["handler"] = signal.getsignal(signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "handler": before}
