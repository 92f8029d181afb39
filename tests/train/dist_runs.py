"""Several `awm-fast train` command lines in ONE torchrun launch (one interpreter start per rank instead of one per
run: imports cost ~6 s of CPU per process on the 2-core CI), one after the other:

    torchrun --standalone --nproc_per_node 2 -m tests.train.dist_runs RUNS.json

RUNS.json: a list of argument lists, each what follows `awm-fast` on the command line (["train", ...]); the
first that fails stops the launch with its exit code. The runs share one gloo process group, joined here before
the first: the trainer joins an initialised group as it is (distributed.init_distributed) and its closing
`shutdown` is replaced by a barrier. (Destroying the group and joining a new one through torchrun's agent store
reuses the store's keys of the previous group: the 4th such join hung in a trial.)
"""
import faulthandler
import json
import signal
import sys
from datetime import timedelta


def main(path: str) -> int:
    import torch.distributed as dist

    from awm_fast.cli import main as cli
    from awm_fast.train import distributed, trainer

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))

    def keep_group() -> None:
        dist.barrier()
        distributed._CURRENT = distributed.Dist()

    trainer.shutdown = keep_group
    try:
        for argv in json.loads(open(path).read()):
            code = cli(argv)
            if code:
                return code
        return 0
    finally:
        distributed.shutdown()  # after the runs' DDP wrappers are gone (distributed.shutdown's docstring)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks on SIGUSR1 (hooked_cli.kill_tree)
    sys.exit(main(sys.argv[1]))
