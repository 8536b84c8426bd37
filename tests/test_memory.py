"""PeakMemory sees freed temporaries, stays quiet when idle, and always stops its poll thread."""

import threading
import time

import pytest
import torch

from lineareval import memory
from lineareval.memory import PeakMemory, tensor_bytes

MB = 1_000_000


def _poll_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "PeakMemory-poll"]


def test_cpu_peak_sees_tensor_freed_before_exit():
    with PeakMemory("cpu") as mem:
        assert mem.polling
        x = torch.ones(50 * MB, dtype=torch.float32)  # 200 MB, touched by the fill
        time.sleep(0.05)  # many poll intervals, so the reading does not hinge on scheduling
        del x
    assert mem.method == "cpu_rss_poll"
    assert 150 * MB <= mem.peak_increase_bytes <= 400 * MB
    assert mem.peak_bytes == mem.baseline_bytes + mem.peak_increase_bytes
    # Freed before exit: an exit-only reading would have missed it.
    assert memory._rss_bytes() < mem.baseline_bytes + 100 * MB


def test_cpu_idle_block_is_small():
    with PeakMemory("cpu") as mem:
        time.sleep(0.02)
    assert 0 <= mem.peak_increase_bytes < 50 * MB
    assert mem.baseline_bytes > 0


def test_poll_thread_runs_inside_and_stops_after():
    with PeakMemory("cpu") as mem:
        assert len(_poll_threads()) == 1
    assert not mem.polling
    assert _poll_threads() == []


def test_poll_thread_stops_when_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with PeakMemory("cpu") as mem:
            assert mem.polling
            raise RuntimeError("boom")
    assert not mem.polling
    assert _poll_threads() == []
    assert mem.peak_bytes >= mem.baseline_bytes > 0


def test_getrusage_fallback_without_proc(monkeypatch):
    monkeypatch.setattr(memory, "_STATM", "/nonexistent/statm")
    with PeakMemory("cpu") as mem:
        assert not mem.polling
    assert mem.method.startswith("cpu_getrusage")
    assert mem.peak_increase_bytes >= 0
    assert mem.baseline_bytes > 0


@pytest.mark.parametrize("bad", [{"device": "meta"}, {"device": "cpu", "poll_interval_s": 0}])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        PeakMemory(**bad)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ((torch.zeros(3, 4, dtype=torch.float32),), 48),
        ((torch.zeros(10, dtype=torch.float16), torch.zeros(2, 2, dtype=torch.int64)), 20 + 32),
        ((torch.zeros(5, dtype=torch.bool), None), 5),
        ((torch.zeros(4, 6, dtype=torch.bfloat16)[:, :2],), 16),  # a view counts at its own size
        ((), 0),
    ],
)
def test_tensor_bytes(tensors, expected):
    assert tensor_bytes(*tensors) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_sees_tensor_freed_before_exit():
    device = torch.device("cuda")
    keep = torch.ones(16 * MB, device=device)  # 64 MB already held: baseline, not increase
    with PeakMemory(device) as mem:
        x = torch.ones(64 * MB, device=device)  # 256 MB
        del x
    assert mem.method == "cuda_max_memory_allocated"
    assert mem.baseline_bytes >= tensor_bytes(keep)
    assert 256 * MB <= mem.peak_increase_bytes < 300 * MB
    assert mem.peak_bytes == mem.baseline_bytes + mem.peak_increase_bytes


def test_keep_freed_heap_sets_glibc_thresholds_or_says_it_cannot(monkeypatch):
    import ctypes

    from lineareval import memory

    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        assert memory.keep_freed_heap() is False
    else:
        assert memory.keep_freed_heap() is True
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert memory.keep_freed_heap() is False
