"""Runs on four CPU processes that several test modules read: the most expensive launches of the suite, made once.

`four_rank_runs`: the same global batches (eight micro-batches a step) run by one process accumulating eight and by
four processes accumulating two at EP=1, 2 and 4 (test_four_ranks.py). `four_rank_ep2_resumed`: the EP=2 run stopped
by SIGTERM after one of its steps and resumed from its checkpoint (test_checkpoint.py)."""
import pytest

from helpers import FOUR_RANK_EP2, FOUR_RANK_RUN, read_metrics, train, train_until_sigterm

@pytest.fixture(scope="session")
def four_rank_runs(tmp_path_factory):
    out = {"accum": tmp_path_factory.mktemp("accum8")}
    train(out["accum"], *FOUR_RANK_RUN, "--ep-size", "1", "--grad-accum", "8", nproc=1)
    for ep in (1, 2, 4):
        out[ep] = tmp_path_factory.mktemp(f"ranks4_ep{ep}")
        train(out[ep], *FOUR_RANK_RUN, "--ep-size", str(ep), "--grad-accum", "2", nproc=4)
    return out


@pytest.fixture(scope="session")
def four_rank_ep2_resumed(tmp_path_factory):
    """(output dir, the stopped run's output, steps logged when it stopped, the resumed run's stdout)."""
    out = tmp_path_factory.mktemp("ranks4_ep2_resumed")
    first_output = train_until_sigterm(out, *FOUR_RANK_EP2, after_steps=1, nproc=4)
    stopped_at = len(read_metrics(out))
    second = train(out, *FOUR_RANK_EP2, "--resume", "latest", nproc=4)
    return out, first_output, stopped_at, second.stdout
