"""Runs that several test modules read: the most expensive launches of the suite, made once.

`exported_run`: two processes at EP=2 exporting hf/ and reporting to TensorBoard (test_export.py, test_trackers.py).
`four_rank_runs`: the same global batches (eight micro-batches a step) run by one process accumulating eight and by
four processes accumulating two at EP=1, 2 and 4 (test_four_ranks.py; the one process's per-step checkpoints:
test_checkpoint.py). `four_rank_ep2_resumed`: the EP=2 run stopped by SIGTERM after one of its steps and resumed
from its checkpoint (test_checkpoint.py)."""
import importlib.util

import pytest

from helpers import EVAL, FOUR_RANK_EP2, FOUR_RANK_RUN, SAMPLE, read_metrics, train, train_until_sigterm


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """Two processes at EP=2, evaluated every 2 of 5 steps, hf/ exported (test_export.py), the numbers also sent to
    TensorBoard where it is installed (test_trackers.py)."""
    out = tmp_path_factory.mktemp("exported")
    board = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    train(out, "--data", str(SAMPLE), "--eval-data", str(EVAL), "--eval-steps", "2", "--max-steps", "5",
          "--lr", "3e-3", "--max-tokens-per-batch", "1024", "--max-seq-len", "512", "--ep-size", "2", *board)
    return out


@pytest.fixture(scope="session")
def four_rank_runs(tmp_path_factory):
    out = {"accum": tmp_path_factory.mktemp("accum8")}
    # it also keeps the newest two of its per-step checkpoints (test_checkpoint.py)
    train(out["accum"], *FOUR_RANK_RUN, "--ep-size", "1", "--grad-accum", "8", "--save-steps", "1",
          "--save-total-limit", "2", nproc=1)
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
