"""Fine-tune a text classifier with DistributedDataParallel, one process per GPU (or CPU process).

    torchrun --standalone --nproc_per_node=2 training/train_ddp.py --num_samples 200 --epochs 1
    torchrun --standalone --nproc_per_node=8 training/train_ddp.py --epochs 3 --batch_size 32
    # two nodes: run on each, with R = 0 and 1
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 training/train_ddp.py --epochs 3

Same flags and engine as train_single.py (installed: ``torchrun ... -m encoderfit train``). --batch_size
is per process: the global batch is batch_size x world size x grad_accum_steps. NCCL on GPUs (one per
LOCAL_RANK), gloo on CPU. Global rank 0 alone prints, writes metrics and saves checkpoints.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's package, run from anywhere

from encoderfit.utils import launched_by_torchrun  # noqa: E402

if __name__ == "__main__":
    if not launched_by_torchrun():
        print("error: train_ddp.py is started by torchrun, e.g. "
              "`torchrun --standalone --nproc_per_node=2 training/train_ddp.py ...`; "
              "for one process use training/train_single.py", file=sys.stderr)
        sys.exit(2)
    from encoderfit.cli.train import main
    sys.exit(main(use_torchrun=True, description=__doc__.split("\n\n")[0]))
