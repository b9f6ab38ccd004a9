"""Bench session: prints the table of :mod:`_report` (TOPS and ratio to the baseline) and saves its JSON."""
import pytest

from _report import ROWS, save, table


@pytest.fixture(scope="session", autouse=True)
def bench_report():
    yield
    if not ROWS:
        return
    import torch
    import triton

    print("\n" + table(ROWS))
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__)
    print(f"saved {save(ROWS, meta)}")
