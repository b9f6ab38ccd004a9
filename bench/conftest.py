"""Bench session: prints the table of :mod:`_report` (rates and ratio to the baseline) and saves its JSON."""
import pytest

from _report import ROWS, save, table


@pytest.fixture(scope="session", autouse=True)
def bench_report():
    yield
    if not ROWS:
        return
    import platform

    import torch
    import triton

    print("\n" + table(ROWS))
    meta = dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, cpu=platform.processor()
                or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton.__version__)
    print(f"saved {save(ROWS, meta)}")
