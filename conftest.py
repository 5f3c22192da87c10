import signal

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a busy machine does not slow them down as much."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def signal_handlers():
    """train.py run in this process (runpy) catches SIGTERM and SIGUSR1 for its preemption save, and puts pytest's
    handlers back when it ends; a run that a test stops with an exception does not: put them back here."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
