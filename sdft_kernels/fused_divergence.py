"""``fused_linear_divergence``: LM head + student/teacher divergence without [N, V] logits."""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from .chunked import ChunkedObjective
from .divergence import DivergenceSpec, make_spec
from .heads import check_softcap, effective_temperature, with_bias
from .input_checks import check_importance, check_inputs, check_row_inputs
from .objectives import TokenImportance, Weighted, make_objective, sequence_importance_weights

BACKENDS = ("auto", "triton", "torch")


def _triton_backend(device: torch.device):
    """``triton_backend``, after checking it can run on ``device``'s tensors."""
    try:
        from . import triton_backend
    except ImportError as err:
        raise RuntimeError(f"backend 'triton' needs the triton package: {err}") from err
    if device.type != "cuda" and not triton_backend.interpreting():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing "
                           "sdft_kernels; use backend='torch' (the default on CPU) instead")
    return triton_backend


class _RowDivergence(torch.autograd.Function):
    """Per-row divergence; gradients flow to the student hidden states and the LM-head weight only."""

    @staticmethod
    def forward(ctx, h_s, h_t, w, w_t, spec: DivergenceSpec, backend, shared: bool):
        if h_s.shape[0] == 0:
            loss, stats = h_s.new_zeros(0, dtype=torch.float32), None
        else:
            loss, stats = backend.forward(h_s, h_t, w, w_t, spec, shared)
        ctx.save_for_backward(h_s, h_t, w, w_t, stats)
        ctx.spec, ctx.backend, ctx.shared = spec, backend, shared
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        h_s, h_t, w, w_t, stats = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if h_s.shape[0] == 0:
            d_h = torch.zeros_like(h_s) if need_h else None
            d_w = torch.zeros_like(w) if need_w else None
            return d_h, None, d_w, None, None, None, None
        row_grad = grad_rows.to(torch.promote_types(grad_rows.dtype, torch.float32)) * ctx.spec.inv_temperature
        d_h, d_w = ctx.backend.backward(h_s, h_t, w, w_t, stats, row_grad, ctx.spec, ctx.shared,
                                        need_h, need_w)
        return d_h, None, d_w, None, None, None, None


class _ScalarDivergence(torch.autograd.Function):
    """Summed (or mean) divergence with its gradients computed during the forward pass.

    The upstream gradient of a scalar only scales dH and dW, so they are computed chunk by chunk
    next to the loss (no logits recompute) and scaled in backward. Double backward is refused.
    """

    @staticmethod
    def forward(ctx, h_s, h_t, w, w_t, spec: DivergenceSpec, backend, scale: float):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if h_s.shape[0] == 0:
            total = h_s.new_zeros((), dtype=torch.float32)
            d_h = torch.zeros_like(h_s) if need_h else None
            d_w = torch.zeros_like(w) if need_w else None
        else:
            total, d_h, d_w = backend.forward_with_grad(h_s, h_t, w, w_t, spec, need_h, need_w)
        ctx.save_for_backward(d_h, d_w)
        ctx.scale, ctx.h_dtype, ctx.w_dtype = scale, h_s.dtype, w.dtype
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        d_h, d_w = ctx.saved_tensors
        factor = grad_total * ctx.scale
        # Backward runs once (once_differentiable), so the saved buffers can be scaled in place.
        d_h = d_h.mul_(factor).to(ctx.h_dtype) if d_h is not None else None
        d_w = d_w.mul_(factor).to(ctx.w_dtype) if d_w is not None else None
        return d_h, None, d_w, None, None, None, None


def implementation(objective, per_row: dict, backend: str, device: torch.device, softcap, unweighted: bool):
    """What runs ``objective`` (the one dispatch): an object with ``forward``, ``backward`` and, for
    scalar losses, ``forward_with_grad``.

    * ``triton_backend`` itself: the plain full-vocabulary divergence on CUDA (``backend="auto"``) or
      wherever ``backend="triton"`` asks;
    * ``triton_backend.kernels_for(...)``: soft cap, the sampled-token estimator and (only with
      ``backend="triton"``: not yet measured on a GPU) top-k on the Triton kernels;
    * ``chunked.ChunkedObjective``: everything else, and every objective on CPU or with
      ``backend="torch"``; importance weights and per-token weights always run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    kernel = objective.kernel if unweighted else None
    if backend == "triton" and kernel is None:
        raise ValueError("backend='triton' computes the full-vocabulary divergence, top-k and the sampled-token "
                         "estimator; is_clip and weights run on backend='auto' or 'torch'")
    on_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
    if on_triton and kernel == "full" and softcap is None:
        return _triton_backend(device)
    if on_triton and kernel is not None and (backend == "triton" or kernel != "topk"):
        return _triton_backend(device).kernels_for(objective, per_row, softcap)
    return ChunkedObjective(objective, per_row, softcap)


def on_device_of(tensor: torch.Tensor):
    """``tensor``'s CUDA device as the current one while the kernels launch: Triton launches on the current
    device, which is not the tensors' for a model on ``cuda:1`` in a process whose current device is 0
    (autograd's backward runs on the tensors' device by itself)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    mode: str = "full",
    topk: int | None = None,
    topk_support: str = "student",
    add_tail: bool = False,
    targets: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    is_clip: float | None = None,
    is_level: str = "token",
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Divergence between softmax(student_hidden @ weight.T / T) and the teacher's, per token.

    ``student_hidden`` [..., H] and ``teacher_hidden`` [..., H_t] hold one row per scored token;
    ``weight`` [V, H] is the LM head, ``teacher_weight`` [V, H_t] a separate teacher head (None: the
    teacher uses ``weight``). ``mask`` [...] selects the tokens that count. The teacher gets no
    gradient. Returns an fp32 scalar (``mean`` over selected tokens, ``sum``) or per-token losses
    (``none``, zero where masked). ``backend``: ``auto`` (Triton on CUDA, chunked PyTorch on CPU),
    ``triton`` or ``torch``.

    Objectives (``sdft_kernels.objectives``; TRL's names in brackets):

    * ``topk=k`` [``distillation_topk``]: the divergence on the student's top-k ids
      (``topk_support="teacher"``: the teacher's), renormalised, or with one tail bucket when
      ``add_tail`` [``distillation_add_tail``].
    * ``mode="sampled_token"`` with ``targets`` [...] (the sampled ids): TRL's reverse-KL estimator
      ``(log p(y) - log q(y)).detach() * log p(y)``.
    * ``is_clip`` with ``targets`` and ``old_logprobs`` [...] (rollout-time log-probs of the sampled
      tokens): importance-sampling correction, per token (``is_level="token"``, TRL) or one weight per
      sequence (``"sequence"``, the paper: inputs [B, L]), capped at ``is_clip``.
    * ``weights`` [...]: a constant per-token weight (e.g. 1/sequence length for per-sequence means).

    On CPU these run through ``sdft_kernels.chunked`` (exact, chunk by chunk). On CUDA the sampled-token
    estimator and the soft cap run on the Triton kernels; top-k has a Triton kernel too (a streamed
    running top-k, ``backend="triton"``, k <= 256), not yet the default there as it has not been
    measured on a GPU; ``is_clip`` and ``weights`` always run chunked.

    LM heads of other model families (``sdft_kernels.heads``): ``bias`` [V] (``teacher_bias`` for a
    separate teacher head; None there: the student's), ``logit_scale`` multiplying the logits
    (Cohere; Granite's ``logits_scaling`` is 1 / it) and ``softcap`` (Gemma-2: ``cap * tanh(z / cap)``),
    all before the temperature (soft cap: in the Triton kernels and the chunked path).
    """
    check_softcap(softcap)
    if softcap is not None:  # cap*tanh(scale*z/cap) = scale * (cap/scale)*tanh(z/(cap/scale))
        softcap = softcap / logit_scale if logit_scale > 0 else softcap
    temperature = effective_temperature(temperature, logit_scale)
    spec = make_spec(divergence, beta, temperature)
    objective = make_objective(spec, mode=mode, topk=topk, topk_support=topk_support, add_tail=add_tail)
    t_weight = check_inputs(student_hidden, teacher_hidden, weight, teacher_weight, mask, reduction)
    if bias is not None or teacher_bias is not None:
        student_hidden, teacher_hidden, weight, teacher_weight = with_bias(
            student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias)
        t_weight = weight if teacher_weight is None else teacher_weight
    lead = student_hidden.shape[:-1]
    per_row = check_row_inputs(lead, weight.shape[0], student_hidden.device, targets=targets,
                               old_logprobs=old_logprobs, weights=weights)
    check_importance(is_clip, is_level, targets, old_logprobs, lead)
    if is_clip is not None and is_level == "token":
        objective = TokenImportance(objective, is_clip)
    missing = [name for name in objective.needs if name not in per_row and name != "weights"]
    if missing:
        raise ValueError(f"mode={mode!r} needs {' and '.join(missing)} (one per token)")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous()
    selected = None
    if mask is not None:
        selected = mask.reshape(-1).bool().nonzero().squeeze(1)
        h_s = h_s.index_select(0, selected)
        h_t = h_t.index_select(0, selected)
        per_row = {k: v.index_select(0, selected) for k, v in per_row.items()}
    if is_clip is not None and is_level == "sequence":
        logp = ChunkedObjective(objective, per_row, softcap).token_logprobs(h_s.contiguous(), weight, spec)
        if selected is not None:
            logp = logp.new_zeros(mask.numel()).index_copy(0, selected, logp)
        keep = torch.ones(lead, dtype=torch.bool, device=h_s.device) if mask is None else mask.bool()
        seq = sequence_importance_weights(logp.reshape(lead), old_logprobs.to(logp.dtype), keep, is_clip).reshape(-1)
        seq = seq if selected is None else seq.index_select(0, selected)
        per_row["weights"] = per_row["weights"] * seq if "weights" in per_row else seq
    if "weights" in per_row:
        objective = Weighted(objective)
    impl = implementation(objective, per_row, backend, student_hidden.device, softcap,
                          unweighted=weights is None and is_clip is None)
    shared = teacher_weight is None or teacher_weight is weight
    args = (h_s.contiguous(), h_t, weight.contiguous(), t_weight.detach().contiguous(), spec, impl)
    wants_grad = torch.is_grad_enabled() and (h_s.requires_grad or weight.requires_grad)
    with on_device_of(h_s):
        if reduction != "none" and hasattr(impl, "forward_with_grad") and wants_grad:
            scale = 1.0 if reduction == "sum" else 1.0 / max(h_s.shape[0], 1)
            return _ScalarDivergence.apply(*args, scale)
        rows = _RowDivergence.apply(*args, shared)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(rows.shape[0], 1)
    if selected is not None:
        rows = rows.new_zeros(mask.numel()).index_copy(0, selected, rows)
    return rows.reshape(lead)
