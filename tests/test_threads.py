"""Torch threads that follow the free cores (`raydraft.threads`), against real load."""

import subprocess
import sys
import time

import pytest
import torch

from raydraft.threads import CoreShare, threads_for, usable_cores


def test_a_core_counts_when_the_others_leave_most_of_it():
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.7, 2) == 2  # a browser's 0.3 of a core: still both
    assert threads_for(1.5, 2) == 1  # half a core taken: two threads would wait on it
    assert threads_for(0.2, 4) == 1  # never none
    assert threads_for(7.9, 4) == 4  # never above the limit


def test_a_fixed_setting_is_kept_whatever_the_load():
    share = CoreShare.for_setting(1)
    with share.working() as threads:
        assert threads == 1 == torch.get_num_threads()
    assert not share.measurable


def _compute(seconds: float) -> None:
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a / 256)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures through /proc")
def test_a_process_burning_a_core_takes_one_thread_away():
    previous = torch.get_num_threads()
    share = CoreShare()
    try:
        assert share.measurable and share.limit == usable_cores()
        with share.working():
            _compute(1.0)
        idle_others = share.others
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            with share.working():
                _compute(1.5)
        finally:
            burner.kill()
            burner.wait()
        # The busy loop shows as (most of) one more core kept busy by others.
        assert share.others - idle_others > 0.6
        assert share.threads == threads_for(usable_cores() - share.others, share.limit)
        if usable_cores() == 2:
            assert share.threads == 1
        with share.working() as threads:  # the next piece of work runs at that count
            assert torch.get_num_threads() == threads == share.threads
            _compute(1.0)
        assert share.others < idle_others + 0.4  # the burner is gone: the cores come back
    finally:
        torch.set_num_threads(previous)
