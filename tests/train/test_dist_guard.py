"""`Dist.guard`: which errors become a CollectiveError. any_error=True: every RuntimeError of a multi-process
run. any_error=False (a block that does more than communicate): torch's typed distributed errors, and gloo's
failures, which torch raises as a bare RuntimeError (a real one here, from a gloo group whose peer is gone)."""
import datetime
import gc
import threading

import pytest
import torch
import torch.distributed as dist

from awm_fast.train.distributed import CollectiveError, Dist, TrainingError


def gloo_error_from_a_gone_peer() -> RuntimeError:
    """The error of an all-reduce on a 2-rank gloo group (both ranks in this process) after rank 1 left."""
    store, groups = dist.HashStore(), [None, None]

    def join(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(dist.PrefixStore("guard", store), rank, 2, datetime.timedelta(seconds=5))

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    survivor = groups[0]
    groups.clear()
    gc.collect()
    try:
        survivor.allreduce([torch.ones(3)]).wait()
    except RuntimeError as exc:
        return exc
    finally:
        del survivor
        gc.collect()
    raise AssertionError("the all-reduce without its peer succeeded")


def _outcome(d: Dist, exc: BaseException, any_error: bool) -> BaseException:
    with pytest.raises(BaseException) as info:
        with d.guard("the step", any_error=any_error):
            raise exc
    return info.value


def test_gloo_failure_is_a_collective_error_even_where_other_errors_pass():
    exc = gloo_error_from_a_gone_peer()
    got = _outcome(Dist(rank=0, world=2, timeout_s=5), exc, any_error=False)
    assert isinstance(got, CollectiveError) and got.__cause__ is exc
    assert "rank 0/2: the step failed or timed out (run.dist_timeout_s=5)" in str(got)


@pytest.mark.parametrize("exc", [dist.DistBackendError("NCCL error: unhandled system error"),
                                 dist.DistStoreError("wait timeout"), RuntimeError("Gloo: Timed out waiting")])
def test_communication_failures_become_collective_errors(exc):
    got = _outcome(Dist(rank=1, world=2), exc, any_error=False)
    assert isinstance(got, CollectiveError) and got.__cause__ is exc and "rank 1/2" in str(got)


@pytest.mark.parametrize("exc", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
                                 TrainingError("the reward server timed out"),
                                 torch.OutOfMemoryError("CUDA out of memory; NCCL")])
def test_other_errors_pass_through_a_block_that_does_more_than_communicate(exc):
    assert _outcome(Dist(rank=0, world=2), exc, any_error=False) is exc


def test_any_error_and_single_process():
    exc = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert isinstance(_outcome(Dist(rank=0, world=2), exc, any_error=True), CollectiveError)
    assert _outcome(Dist(), exc, any_error=True) is exc
    assert _outcome(Dist(rank=0, world=2), ValueError("timed out"), any_error=True).__class__ is ValueError
