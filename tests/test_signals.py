"""SIGTERM is handled like Ctrl-C: a KeyboardInterrupt naming the signal, previous handlers restored."""

import signal
import subprocess
import sys
import threading

import pytest

from tlkit import _signals as signals
from tlkit._signals import TrainingInterrupted, exit_status, interrupt_on_signals

# Loaded by path: importing the tlkit package would import torch and timm in the child.
CHILD = f"""
import importlib.util, signal, time
spec = importlib.util.spec_from_file_location("signals", {signals.__file__!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
try:
    with mod.interrupt_on_signals():
        print("ready", flush=True)
        time.sleep(30)
    print("not interrupted")
except KeyboardInterrupt as e:
    print("caught", type(e).__name__, e.signal_name, mod.exit_status(e))
finally:
    print("finally ran")
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_sigterm_raises_a_keyboard_interrupt_naming_it_and_restores_the_default():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    finally:
        p.kill()
    assert out.splitlines() == ["caught TrainingInterrupted SIGTERM 143", "finally ran", "restored True"]
    assert p.returncode == 0


def test_the_previous_handler_comes_back_also_after_an_error():
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(ValueError):
            with interrupt_on_signals() as installed:
                assert installed and signal.getsignal(signal.SIGTERM) is signals._raise_interrupted
                raise ValueError
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def run():
        with interrupt_on_signals() as installed:
            seen.append((installed, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [(False, before)]


def test_exit_status_is_128_plus_the_signal():
    assert exit_status(KeyboardInterrupt()) == 130
    assert exit_status(TrainingInterrupted(signal.SIGTERM)) == 143
    assert isinstance(TrainingInterrupted(signal.SIGTERM), KeyboardInterrupt)
    assert str(TrainingInterrupted(signal.SIGTERM)) == "interrupted by SIGTERM"
