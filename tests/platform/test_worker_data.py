import subprocess
import sys
import time

from ssn_platform.worker_data import StartupClock


def test_the_startup_clock_counts_the_process_life_before_it_and_each_marked_step():
    code = (
        "import time; time.sleep(1.0); from ssn_platform.worker_data import StartupClock; "
        "print(StartupClock().seconds['process'])"
    )
    before_clock = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert 1.0 <= before_clock < 60  # clock ticks are 10 ms; the sleep alone is 1 s

    clock = StartupClock()
    time.sleep(0.2)
    clock.mark("data")
    clock.mark("model")
    metrics = clock.metrics()
    assert set(metrics) == {"startup_process_seconds", "startup_data_seconds", "startup_model_seconds"}
    assert metrics["startup_data_seconds"] >= 0.2
    assert 0 <= metrics["startup_model_seconds"] < metrics["startup_data_seconds"]
