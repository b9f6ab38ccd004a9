"""Run by ``test_ptq_ddp.py`` under ``torchrun --nproc-per-node 2`` (gloo): quant.run's data-parallel e2e, in one
process group (initialised here, so several runs fit in one launch):

1. ``<root>/full``: a whole run with an export;
2. ``<root>/parts``: stopped after 3 steps (its checkpoint copied to ``<root>/step3.pt``), then ``--resume``d;
3. ``--method blockwise``: refused (exit status 2).

Prints ``rcs [...]`` (rank 0) with the exit statuses.
"""
import shutil
import sys

import torch.distributed as dist

from quant.run import main, state_path


def go(root: str, base: list) -> int:
    dist.init_process_group("gloo")
    rcs = [main(base + ["--out", f"{root}/full", "--export", "<out>/model.lowbit"]),
           main(base + ["--out", f"{root}/parts", "--save-every", "3", "--stop-after", "3"])]
    if dist.get_rank() == 0:
        shutil.copy(state_path(f"{root}/parts"), f"{root}/step3.pt")
    dist.barrier()
    rcs.append(main(base + ["--out", f"{root}/parts", "--save-every", "3", "--resume"]))
    rcs.append(main(base + ["--out", f"{root}/refused", "--method", "blockwise"]))
    if dist.get_rank() == 0:
        print("rcs", rcs, flush=True)
    dist.destroy_process_group()
    return 0 if rcs == [0, 0, 0, 2] else 1


if __name__ == "__main__":
    sys.exit(go(sys.argv[1], sys.argv[2:]))
