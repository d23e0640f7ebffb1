"""Each token's routed rows summed back into it, as the scatter-add of gathering them would."""
import subprocess
import sys

import pytest
import torch

from helpers import REPO, cpu_env
from qwen_moe_ft.fastpath.token_rows import row_positions, sum_token_rows


def test_the_sum_of_a_tokens_rows_is_the_gathers_backward():
    g = torch.Generator().manual_seed(0)
    tokens, top_k, hidden = 50, 4, 24
    rows = torch.randperm(tokens * top_k, generator=g)  # the (token, slot) pairs in some experts' order
    x = torch.randn(tokens, hidden, requires_grad=True)
    grad_rows = torch.randn(tokens * top_k, hidden, generator=g)
    x.index_select(0, rows // top_k).backward(grad_rows)
    torch.testing.assert_close(sum_token_rows(grad_rows, row_positions(rows), top_k), x.grad)


@pytest.mark.gpu
def test_triton_gather_sum_matches_embedding_bag():
    torch.manual_seed(0)
    tokens, top_k, hidden = 1000, 8, 2048 + 64  # a hidden size that is not a multiple of the block
    grad_rows = torch.randn(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    position = torch.randperm(tokens * top_k, device="cuda")
    ours = sum_token_rows(grad_rows, position, top_k)
    reference = torch.nn.functional.embedding_bag(position.view(-1, top_k), grad_rows.float(), mode="sum")
    torch.testing.assert_close(ours.float(), reference, rtol=2**-7, atol=1e-2)


def test_the_quack_experts_build_on_token_rows_not_on_the_dispatch_that_calls_them():
    """local_dispatch imports quack_experts where it is switched on; the arrow goes that way only."""
    code = "import sys, qwen_moe_ft.fastpath.quack_experts; print('qwen_moe_ft.fastpath.local_dispatch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == "False"
