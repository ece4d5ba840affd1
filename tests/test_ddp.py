"""A hybridized model trains under DistributedDataParallel (gloo, 2 CPU processes) and its
quantizer and gate parameters stay identical across the processes."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import hybridops as ho


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)  # same float weights on both ranks
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        # calibrate BEFORE wrapping in DDP, on the same data everywhere
        calib = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        ho.hybridize_(model, ho.HybridConfig(keep=0.5, gate_init_logit=0.5), example_inputs=calib)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data and Gumbel noise
        torch.manual_seed(1000 + rank)
        ddp.train()
        losses = []
        for _ in range(3):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 3, (4,), generator=g)
            loss = F.cross_entropy(ddp(x), y) + ho.regularization(model, 1e-2, 1e-2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {}
        for name, m in model.named_modules():
            if isinstance(m, ho.IntervalQuantizer):
                state[name + ".c"] = m.c.detach().clone()
                state[name + ".log_d"] = m.log_d.detach().clone()
            if isinstance(m, (ho.QuantConv2d, ho.QuantLinear)):
                state[name + ".out_scale"] = m.out_scale.detach().clone()
                state[name + ".weight"] = m.weight.detach().clone()
            if isinstance(m, ho.ChannelGate):
                state[name + ".logits"] = m.logits.detach().clone()
        gathered = [None] * world
        dist.all_gather_object(gathered, state)
        if rank == 0:
            torch.save({"states": gathered, "losses": losses}, os.path.join(out_dir, "result.pt"))
        # Tear down together: a rank destroying its group while rank 0 (the TCP store's host) is
        # still saving aborted once in CI ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_keep_quantizers_and_gates_identical():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        result = torch.load(os.path.join(out_dir, "result.pt"))
    s0, s1 = result["states"]
    assert set(s0) == set(s1)
    assert sum(k.endswith(".logits") for k in s0) == 3
    assert sum(k.endswith(".c") for k in s0) == 5  # 3 weight quantizers + 2 input quantizers (first is fp)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs across ranks"
    # training actually moved them (so equality is not trivially the initial state)
    init = _model()
    ho.hybridize_(init, ho.HybridConfig(keep=0.5, gate_init_logit=0.5),
                  example_inputs=torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    init_state = dict(init.named_parameters())
    moved = [k for k in s0 if k in init_state and not torch.equal(init_state[k].detach(), s0[k])]
    assert any(k.endswith(".logits") for k in moved) and any(k.endswith(".c") for k in moved)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
