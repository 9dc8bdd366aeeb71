"""Scaled residual sums `skip * x + scale * y` in as few operators as their gradients allow.

SReT's block and mix layer gate both terms of every residual sum with a learnable scalar,
and stochastic depth scales the branch per sample. Written as `x * a + y * b` this costs
three full-size operators forward and six backward (each scalar's gradient is a full
product and a reduction), and a (1,)-shaped float32 scalar promotes a bfloat16 branch to
float32. Here the scalars enter as 0-dim tensors, which never promote, the sum is one
`addcmul` after one product, and in eager training a custom backward computes each
scalar's gradient as one dot product (per sample for a per-sample scale): four operators
backward, none of them a full-size temporary.
"""

from __future__ import annotations

import torch

from vitblocks.layers.custom_backward import custom_backward_applies


class _ScaledResidual(torch.autograd.Function):
    """`skip * x + scale * mask * y` with 0-dim `skip` and `scale`, and a (B, 1, ..., 1) `mask` or None."""

    @staticmethod
    def forward(ctx, x, skip, y, scale, mask):  # noqa: D102 - see the class
        ctx.save_for_backward(x, skip, y, scale, mask)
        return torch.addcmul(x * skip, y, _gate(scale, mask, x, y))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, skip, y, scale, mask = ctx.saved_tensors
        need_x, need_skip, need_y, need_scale, _ = ctx.needs_input_grad
        grad_x = grad_skip = grad_y = grad_scale = None
        if need_x or need_skip:
            grad_at_x = grad.to(x.dtype)  # the gradient in each input's dtype: one cast, where they differ
            grad_x = grad_at_x * skip if need_x else None
            if need_skip:
                grad_skip = torch.dot(grad_at_x.reshape(-1), x.reshape(-1)).to(skip.dtype)
        if need_y or need_scale:
            grad_at_y = grad.to(y.dtype)
            if need_y:
                # the gate is recomputed rather than saved: a tensor made in forward is a constant to autograd,
                # and a double backward (a gradient penalty) would lose its dependence on `scale`
                gate = _gate(scale, mask, x, y)
                grad_y = grad_at_y * (gate if gate.dim() == 0 else gate.to(y.dtype))
            if need_scale and mask is None:
                grad_scale = torch.dot(grad_at_y.reshape(-1), y.reshape(-1)).to(scale.dtype)
            elif need_scale:  # per-sample dot products as a batched (1 x K) @ (K x 1) product, then the mask's
                batch, size = grad.shape[0], grad[0].numel() if grad.shape[0] else 0
                per_sample = torch.bmm(grad_at_y.reshape(batch, 1, size), y.reshape(batch, size, 1))
                grad_scale = torch.dot(per_sample.reshape(-1).to(mask.dtype), mask.reshape(-1)).to(scale.dtype)
        return grad_x, grad_skip, grad_y, grad_scale, None


def _gate(scale: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The branch's factor: `scale`, or `mask * scale` in the sum's dtype."""
    return scale if mask is None else _gate_in_dtype(mask * scale, x, y)


def _gate_in_dtype(gate: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-sample gate in the sum's dtype: a float32 one would promote a bfloat16 sum to float32."""
    if gate.dtype == x.dtype or gate.dtype == y.dtype:
        return gate
    return gate.to(x.dtype if x.dtype.itemsize >= y.dtype.itemsize else y.dtype)


def scaled_residual(
    x: torch.Tensor, skip: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`skip * x + scale * mask * y` for a residual sum with learnable gates.

    Args:
        x: The skip input, e.g. (B, N, C).
        skip: Its gate: a one-element tensor (a (1,) parameter is viewed as 0-dim, so
            it does not change the result's dtype).
        y: The branch output, same shape as `x`.
        scale: The branch's gate, one element.
        mask: A per-sample factor of shape (B, 1, ..., 1) — stochastic depth's 0 or
            1 / keep, see `vitblocks.layers.drop.keep_mask` — or None. It gets no
            gradient.

    Returns:
        The sum, in the dtype of `x` and `y` (the wider of them).

    Examples:
        >>> x, y = torch.ones(2, 3), torch.full((2, 3), 2.0)
        >>> scaled_residual(x, torch.tensor([0.5]), y, torch.tensor([1.0]), torch.tensor([[1.0], [0.0]]))
        tensor([[2.5000, 2.5000, 2.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    skip, scale = skip.reshape(()), scale.reshape(())
    if not custom_backward_applies(x, y):
        return torch.addcmul(x * skip, y, _gate(scale, mask, x, y))
    return _ScaledResidual.apply(x, skip, y, scale, mask)
