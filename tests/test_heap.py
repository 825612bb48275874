"""sdft.heap: glibc keeps freed memory in the process during CPU training (opt-out by config)."""
import sys

import pytest

from sdft import SDFTConfig, heap


def test_keep_freed_memory_is_applied_once_on_glibc(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def gnu_get_libc_version(self):
            return b"2.36"

    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setattr(heap, "_glibc", lambda: FakeLibc())
    assert heap.keep_freed_memory() is True
    assert heap.keep_freed_memory() is True
    assert calls == [(heap.M_MMAP_MAX, 0), (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD_BYTES)]


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_freed_memory() is False


def test_a_refused_setting_reports_false(monkeypatch):
    class Refusing:
        def mallopt(self, param, value):
            return 0

    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setattr(heap, "_glibc", lambda: Refusing())
    assert heap.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_real_glibc_takes_the_settings(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    if heap._glibc() is None:
        pytest.skip("not glibc (e.g. musl)")
    assert heap.keep_freed_memory() is True


def test_config_field_defaults_on_and_validates():
    assert SDFTConfig().cpu_keep_freed_memory is True
    assert SDFTConfig(cpu_keep_freed_memory=False).cpu_keep_freed_memory is False
    with pytest.raises(ValueError, match="cpu_keep_freed_memory"):
        SDFTConfig(cpu_keep_freed_memory="maybe")
