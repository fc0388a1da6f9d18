"""lsync_jax.host.PhaseClock: seconds per phase, nested phases counted once, generators' work timed."""

from lsync_jax import host


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_phases_nest_and_every_second_is_counted_once(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()
    with clock.phase("training"):
        clock_time.now += 3.0
        with clock.phase("checkpoints"):
            clock_time.now += 2.0
        clock_time.now += 1.0
    with clock.phase("checkpoints"):
        clock_time.now += 0.5
    clock_time.now += 4.0  # in no phase
    assert clock.totals == {"training": 4.0, "checkpoints": 2.5}
    lines = clock.report()
    assert lines[0] == "where the time went (10.5 s in all):"
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["training", "checkpoints", "other"]  # phases largest first, then the rest
    assert "4.0 s" in lines[1] and "38.1%" in lines[1] and "4.0 s" in lines[3]


def test_a_phase_ended_by_an_error_is_still_counted(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()
    try:
        with clock.phase("start-up"):
            clock_time.now += 1.5
            raise ValueError("bad config")
    except ValueError:
        pass
    assert clock.totals == {"start-up": 1.5}


def test_timed_counts_only_the_generators_work(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()

    def produce():
        for i in range(3):
            clock_time.now += 2.0  # sampling
            yield i

    with clock.phase("FID"):
        for _ in clock.timed(produce(), "FID: sampling"):
            clock_time.now += 1.0  # the consumer's Inception pass
    assert clock.totals == {"FID: sampling": 6.0, "FID": 3.0}
