"""--gemm-sm-reserve (fastpath/gemm_sms.py): quack's persistent GEMMs launch as many clusters fewer as cover the SMs
reserved, through both of quack's imports of the count, and put back; asked where it cannot work, the run stops with
the reason; on a GPU the experts' chain computes the same bits with SMs reserved (each in a process of its own: quack
keeps the count in the plans it caches)."""
import os
import subprocess
import sys
import types

import pytest
import torch

from helpers import REPO, autoep_engine
from qwen_moe_ft.config import ConfigError, load_config
from qwen_moe_ft.fastpath.gemm_sms import CLUSTER_COUNTERS, fewer_clusters, reserve_sms


def _h100_count(cluster_size: int, device_capacity=None, device_id: int = 0) -> int:
    return 132 // cluster_size  # as cutlass's HardwareInfo answers on an H100 SXM


@pytest.mark.parametrize("sms, cluster_size, clusters", [(16, 1, 116), (16, 2, 58), (3, 2, 64), (500, 2, 1)])
def test_the_count_leaves_the_reserved_sms_in_whole_clusters(sms, cluster_size, clusters):
    counted = fewer_clusters(_h100_count, sms)
    assert counted(cluster_size, device_capacity=(9, 0)) == clusters
    assert counted.reserved_sms == sms


def test_both_of_quacks_counts_are_replaced_and_put_back(monkeypatch):
    # quack needs a GPU to import; the two modules stand in with the attribute this replaces
    modules = {name: types.SimpleNamespace(get_max_active_clusters=_h100_count) for name in CLUSTER_COUNTERS}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    restore = reserve_sms(32)
    assert [m.get_max_active_clusters(2) for m in modules.values()] == [50, 50]
    with pytest.raises(RuntimeError, match="already leave SMs free"):
        reserve_sms(8)
    restore()
    assert all(m.get_max_active_clusters is _h100_count for m in modules.values())
    with pytest.raises(ValueError, match="at least 1 SM"):
        reserve_sms(0)


def test_a_negative_reserve_names_the_option():
    with pytest.raises(ConfigError, match="--gemm-sm-reserve: must not be negative"):
        load_config(["--gemm-sm-reserve", "-8"]).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal of a machine without a GPU")
def test_asked_where_the_updates_do_not_run_beside_the_forward_it_stops_the_run(process_group):
    from qwen_moe_ft.fastpath import FastPath

    with pytest.raises(ConfigError, match=r"--gemm-sm-reserve 16: .*\(step_overlap\); use 0"):
        FastPath().install(autoep_engine(), gemm_sm_reserve=16)


CHAIN = """
import sys, torch
from qwen_moe_ft.fastpath import quack_experts
from qwen_moe_ft.fastpath.gemm_sms import reserve_sms
if int(sys.argv[1]):
    reserve_sms(int(sys.argv[1]))
g = torch.Generator("cuda").manual_seed(0)
tokens, hidden, inter, experts, top_k = 4096, 2048, 768, 128, 8
x = (torch.randn(tokens, hidden, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
w1, w3 = ((torch.randn(experts, inter, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
          for _ in range(2))
w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
logits = torch.randn(tokens, experts, device="cuda", generator=g)
logits[:, -1] = -1e9  # one expert without rows
chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
rows = chosen.argsort(stable=True)
counts = torch.bincount(chosen, minlength=experts)
out = quack_experts.gathered_swiglu_experts(x, w1, w2, w3, rows, counts, top_k)
out.backward(torch.randn(out.shape, device="cuda", generator=g).bfloat16())
torch.save([t.cpu() for t in (out, x.grad, w1.grad, w2.grad, w3.grad)], sys.argv[2])
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="quack's GEMMs need a GPU")
def test_the_experts_chain_computes_the_same_bits_with_sms_reserved(tmp_path):
    from qwen_moe_ft.fastpath.quack_experts import quack_unavailable_because

    if why := quack_unavailable_because(torch.device("cuda")):
        pytest.skip(why)
    results = []
    for sms in (0, 32):
        path = tmp_path / f"chain{sms}.pt"
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run([sys.executable, "-c", CHAIN, str(sms), str(path)], cwd=REPO, capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(path))
    for plain, reserved in zip(*results):
        assert plain.abs().sum() > 0 and torch.equal(plain, reserved)
