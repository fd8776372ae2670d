"""measure_peak (spare_kernels/utils/memory.py): the CPU peak-memory figure used by tests and benchmarks."""
import torch

from spare_kernels.utils.memory import measure_peak

MB = 1 << 20
SLACK = 256 * 1024  # small allocations of the ops themselves (scalars, shapes, reduction outputs)


def test_temporary_inside_mm_is_seen():
    a = torch.randn(4096, 64)
    b = torch.randn(64, 4096)  # a @ b is 4096 x 4096 fp32 = 64 MB, freed before fn returns

    def f():
        return (a @ b).sum()

    out, peak = measure_peak(f)
    assert torch.allclose(out, (a @ b).sum())
    assert 64 * MB <= peak < 64 * MB + SLACK


def test_noop_is_zero():
    x = torch.randn(1000, 1000)  # live before: not counted
    _, peak = measure_peak(lambda: None)
    assert peak == 0
    _, peak = measure_peak(lambda: x.view(-1)[:10])  # a view allocates nothing
    assert peak < 1024


def test_result_and_sequential_temporaries():
    def f():
        t = torch.empty(16 * MB // 4)  # 16 MB, freed
        del t
        u = torch.empty(8 * MB // 4)  # 8 MB, freed
        del u
        return torch.ones(4 * MB // 4)  # 4 MB, kept by the result

    out, peak = measure_peak(f)
    assert out.numel() == MB and 16 * MB <= peak < 16 * MB + SLACK

    def g():
        t = torch.empty(16 * MB // 4)  # 16 MB live while 8 MB more is allocated
        u = torch.empty(8 * MB // 4)
        return t.numel() + u.numel()

    _, peak = measure_peak(g)
    assert 24 * MB <= peak < 24 * MB + SLACK


def test_sees_allocations_inside_ops_of_a_chain():
    x = torch.randn(2048, 2048)  # 16 MB

    def f():
        # exp: 16 MB; (* 2): 16 MB more (32 live), then exp's result is freed (16 live);
        # sum(dtype=float64) makes a hidden float64 copy of its input inside the op: 32 MB (48 live)
        return (x.exp() * 2).sum(dtype=torch.float64)

    _, peak = measure_peak(f)
    assert 48 * MB <= peak < 48 * MB + SLACK

    def g():  # same chain without the hidden copy: the peak is the two 16 MB tensors
        return (x.exp() * 2).sum()

    _, peak = measure_peak(g)
    assert 32 * MB <= peak < 32 * MB + SLACK


def test_repeatable_and_passes_args():
    def f(n, *, scale):
        return torch.zeros(n) * scale

    r1, p1 = measure_peak(f, MB, scale=2.0)
    r2, p2 = measure_peak(f, MB, scale=2.0)
    assert r1.shape == (MB,) and p1 == p2 and 8 * MB <= p1 < 8 * MB + SLACK  # zeros + product
