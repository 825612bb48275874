"""Shared input makers and comparisons for the divergence tests."""
import torch

from sdft_kernels import fused_linear_divergence, reference_linear_divergence

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(n, h, v, dtype=torch.float32, h_teacher=None, scale=1.0, seed=0, device=DEVICE):
    """Random student/teacher hidden states and heads; a separate teacher head when h_teacher is set."""
    gen = torch.Generator().manual_seed(seed)
    h_t = h if h_teacher is None else h_teacher
    student = (torch.randn(n, h, generator=gen) * scale).to(device, dtype).requires_grad_()
    teacher = (torch.randn(n, h_t, generator=gen) * scale).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    teacher_weight = None
    if h_teacher is not None:
        teacher_weight = (torch.randn(v, h_t, generator=gen) / h_t**0.5).to(device, dtype)
    mask = torch.rand(n, generator=gen) > 0.3
    return student, teacher, weight, teacher_weight, mask.to(device)


def rel_err(a, b, floor=1e-30) -> float:
    """||a - b|| / max(||b||, floor)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=floor))


def run_both(student, teacher, weight, teacher_weight, **kw):
    """(our loss, our grads) and (reference loss, reference grads in float64)."""
    ours = fused_linear_divergence(student, teacher, weight, teacher_weight, **kw)
    g_ours = torch.autograd.grad(ours.sum(), (student, weight), allow_unused=True)
    kw.pop("backend", None)
    s64 = student.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    tw64 = None if teacher_weight is None else teacher_weight.double()
    ref = reference_linear_divergence(s64, teacher.double(), w64, tw64, **kw)
    g_ref = torch.autograd.grad(ref.sum(), (s64, w64), allow_unused=True)
    return (ours, g_ours), (ref, g_ref)


def assert_close(ours, ref, tol, grad_floor=1e-30):
    """Losses within tol of max(|ref|, 1); gradients within tol relative to max(||ref||, grad_floor)."""
    (loss, grads), (ref_loss, ref_grads) = ours, ref
    assert torch.isfinite(loss).all()
    # Losses can be exactly 0 (V=1, identical distributions): compare them against max(|ref|, 1).
    err = (loss.detach().double().cpu() - ref_loss.detach().cpu()).abs()
    assert (err <= tol * ref_loss.detach().cpu().abs().clamp(min=1.0)).all(), (loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        if r.abs().max() == 0:
            assert g.abs().max() < 1e-6
        else:
            assert rel_err(g.cpu(), r.cpu(), grad_floor) < tol, rel_err(g.cpu(), r.cpu(), grad_floor)
