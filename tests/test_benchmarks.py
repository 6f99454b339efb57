"""The accounting inside the benchmarks: figures in BENCHMARKS.md are only as right as these."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_clip import MatmulRecorder, matmul_flops, replay_matmuls


def _mlp_step(model, x):
    loss = model(x).pow(2).mean()
    loss.backward()


def test_matmul_recorder_sees_every_matmul_of_forward_and_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 3, 8)
    recorder = MatmulRecorder()
    with recorder:
        _mlp_step(model, x)
    names = [func.overloadpacket.__name__ for func, _, _ in recorder.calls]
    # forward: two addmm; backward: both weights' gradients, and the first layer's output gradient (the input
    # needs none)
    assert sorted(names) == ["addmm", "addmm", "mm", "mm", "mm"]
    model.zero_grad()
    counter = FlopCounterMode(display=False)
    with counter:
        _mlp_step(model, x)
    assert matmul_flops(recorder.calls) == counter.get_total_flops() == 3 * 2 * 15 * (8 * 16 + 16 * 4) - 2 * 15 * 8 * 16


def test_batched_matmuls_are_counted_and_replayed_with_their_layouts():
    a = torch.randn(4, 6, 5)
    b = torch.randn(4, 7, 5).transpose(1, 2)  # a strided operand, as attention's keys are
    recorder = MatmulRecorder()
    with recorder:
        torch.bmm(a, b)
    assert matmul_flops(recorder.calls) == 2 * 4 * 6 * 5 * 7
    operands = {}
    assert replay_matmuls(recorder.calls, operands) > 0
    assert {(tuple(t.shape), t.stride()) for t in operands.values()} == {((4, 6, 5), a.stride()), ((4, 5, 7), b.stride())}
