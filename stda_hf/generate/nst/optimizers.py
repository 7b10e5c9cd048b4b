"""Per-row batched optimisers: L-BFGS with its own history, line search and stopping per row, and Adam.

Pure tensor code that knows nothing of images or style transfer: each optimiser holds a batch of B rows (B, ...),
one point each, takes the loss (B,) and gradient of one batched evaluation per :meth:`step`, and moves every row
on its own, so a row's path does not depend on which other rows share its batch::

    x = start.clone().requires_grad_(True)
    opt = BatchedLBFGS(x, history=10)
    for _ in range(evaluations):
        loss = f(x)                                   # (B,)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        opt.step(x, loss.detach(), grad, torch.isfinite(loss))
    opt.best.reshape(x.shape)                         # each row's lowest point (L-BFGS)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class BatchedLBFGS:
    """L-BFGS over a batch where every row has its own history, line search, step and stopping.

    Each call of :meth:`step` takes the loss and gradient at the current trial points (one batched evaluation)
    and moves every row to its next trial point. Per row: a backtracking line search accepts a trial when
    it lowers the loss by at least ``c1`` times the predicted decrease (Armijo); otherwise the step shrinks
    (quadratic interpolation, kept within [0.1, 0.5] of the last step). An accepted step adds the curvature pair
    ``(s, y)`` when ``y.s > eps |y| |s|`` (a scale-free test), then the next direction comes from the two-loop
    recursion with ``H0 = y.s / y.y``; a direction that is not a descent direction, or more than
    ``max_backtracks`` shrinks, restarts from steepest descent. The first step after a (re)start moves
    ``1 / |g|_2`` along ``-g``, as scipy's L-BFGS-B does. With ``restart`` the history is cleared every
    ``restart`` evaluations, as successive ``fmin_l_bfgs_b(maxfun=restart)`` calls do.

    Nothing depends on the scale of the loss: the tolerances are relative to each row's initial loss
    (``tolerance_change``) and initial gradient (``tolerance_grad``), so multiplying the loss by any constant
    gives the same path. A row stops (keeps its last accepted point) when its gradient falls below its
    tolerance, when no step lowers its loss, or when a steepest-descent step changes its loss by less than
    ``tolerance_change``. An accepted step from the curvature history that makes no such progress (stale pairs
    can make the direction vanishingly short: a 6e-7 step once stopped an image at a quarter of its evaluations,
    5x above the loss it reached after a restart) clears the history and tries steepest descent instead.

    Parameters
    ----------
    x : Tensor
        The start points (B, ...), at least fp32; :meth:`step` writes the next trial points into it.
    lr : float
        Step taken along the L-BFGS direction first (1: the quasi-Newton step).
    history : int
        Curvature pairs kept per row.
    restart : int
        Clear the history every ``restart`` evaluations (0: never).
    project : callable, optional
        Maps trial points back into the feasible set (e.g. clamping to [0, 1]).
    """

    def __init__(
        self,
        x: Tensor,
        lr: float = 1.0,
        history: int = 100,
        restart: int = 0,
        project: Callable[[Tensor], Tensor] | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 2.2e-9,
        c1: float = 1e-4,
        eps: float = 1e-8,
        max_backtracks: int = 20,
    ):
        b, n = x.shape[0], x[0].numel()
        self.lr, self.m, self.restart = lr, history, restart
        self.project = project or (lambda t: t)
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.c1, self.eps, self.max_backtracks = c1, eps, max_backtracks
        zeros = x.new_zeros(b)
        self.s = x.new_zeros(b, history, n)  # accepted steps, one ring per row
        self.y = x.new_zeros(b, history, n)  # gradient differences
        self.rho = x.new_zeros(b, history)  # 1 / (y.s); 0 marks an empty slot
        self.ptr = torch.zeros(b, dtype=torch.long, device=x.device)  # next slot of each ring
        self.h_diag = torch.ones_like(zeros)
        self.active = torch.ones(b, dtype=torch.bool, device=x.device)
        self.evaluations = torch.zeros(b, dtype=torch.long, device=x.device)  # until the row stopped
        self.rejected = torch.zeros_like(self.evaluations)  # trial points the line search rejected
        self.since_restart = torch.zeros_like(self.evaluations)
        self.backtracks = torch.zeros_like(self.evaluations)
        self.x = x.detach().reshape(b, -1).clone()  # last accepted points
        self.f = torch.full_like(zeros, float("inf"))
        self.g = torch.zeros_like(self.x)
        self.d = torch.zeros_like(self.x)  # search directions
        self.t = torch.zeros_like(zeros)  # trial steps along d
        self.f0 = self.g0 = None

    @property
    def best(self) -> Tensor:
        """The last accepted point of every row (B, ...): the lowest loss it reached."""
        return self.x

    @torch.no_grad()
    def step(self, x: Tensor, loss: Tensor, grad: Tensor, finite: Tensor) -> None:
        """Take the loss (B,) and gradient at the trial points ``x``; write the next trial points into ``x``."""
        b = x.shape[0]
        f = loss.detach().to(self.x.dtype)
        g = grad.reshape(b, -1).to(self.x.dtype)
        ok = torch.isfinite(f) & torch.isfinite(g).all(1)
        self.evaluations += self.active.long()
        self.since_restart += 1
        if self.f0 is None:  # the start point
            self.active &= finite & ok
            self.f0, self.g0 = f.abs(), g.abs().amax(1)
            self._accept(self.active, x.reshape(b, -1), f, g)
            self.active &= self.g0 > 0
            self._restart(self.active)
        else:
            trial = x.reshape(b, -1)
            predicted = torch.linalg.vecdot(self.g, trial - self.x)
            accept = self.active & ok & (f <= self.f + self.c1 * predicted)
            reject = self.active & ~accept
            self.rejected += reject.long()
            stalled = accept & (self.f - f <= self.tolerance_change * self.f0)
            curved = (self.rho != 0).any(1)  # the step came from the curvature history, not steepest descent
            self._remember(accept, trial - self.x, g - self.g)
            self._accept(accept, trial, f, g)
            self.active &= ~(stalled & ~curved)
            self.active &= ~(accept & (g.abs().amax(1) <= self.tolerance_grad * self.g0))
            self._new_direction(accept & self.active & ~stalled)
            self._restart(stalled & self.active)
            self._backtrack(reject, f, predicted)
        x.view(b, -1).copy_(torch.where(self.active[:, None], self._trial(), self.x))

    def _trial(self) -> Tensor:
        return self.project(self.x + self.t[:, None] * self.d)

    def _accept(self, rows: Tensor, x: Tensor, f: Tensor, g: Tensor) -> None:
        self.x = torch.where(rows[:, None], x, self.x)
        self.f = torch.where(rows, f, self.f)
        self.g = torch.where(rows[:, None], g, self.g)

    def _remember(self, rows: Tensor, s: Tensor, y: Tensor) -> None:
        """Store the curvature pair of each row in ``rows`` that passes the scale-free test, in its ring."""
        ys = torch.linalg.vecdot(y, s)
        yy = torch.linalg.vecdot(y, y)
        keep = rows & (ys > self.eps * torch.sqrt(yy * torch.linalg.vecdot(s, s)))
        idx = torch.arange(len(s), device=s.device)
        slot = self.ptr
        self.s[idx, slot] = torch.where(keep[:, None], s, self.s[idx, slot])
        self.y[idx, slot] = torch.where(keep[:, None], y, self.y[idx, slot])
        self.rho[idx, slot] = torch.where(keep, 1.0 / torch.where(keep, ys, 1.0), self.rho[idx, slot])
        self.h_diag = torch.where(keep, ys / torch.where(keep, yy, 1.0), self.h_diag)
        self.ptr = torch.where(keep, (self.ptr + 1) % self.m, self.ptr)

    def _restart(self, rows: Tensor) -> None:
        """Clear the history of ``rows`` and step along steepest descent by ``1 / |g|_2``."""
        self.rho[rows] = 0.0
        self.since_restart[rows] = 0
        self.backtracks[rows] = 0
        self.d = torch.where(rows[:, None], -self.g, self.d)
        norm = torch.linalg.vector_norm(self.g, dim=1)
        self.t = torch.where(rows, 1.0 / torch.where(norm > 0, norm, 1.0), self.t)

    def _new_direction(self, rows: Tensor) -> None:
        """L-BFGS directions for ``rows``; restart those due (``restart``) or without a descent direction."""
        due = rows & (self.since_restart >= self.restart) if self.restart else torch.zeros_like(rows)
        d = self._direction(self.g)
        descent = torch.linalg.vecdot(self.g, d) < 0
        fresh = rows & ~due & descent & (self.rho != 0).any(1)
        self.d = torch.where(fresh[:, None], d, self.d)
        self.t = torch.where(fresh, torch.full_like(self.t, self.lr), self.t)
        self.backtracks[fresh] = 0
        self._restart(rows & ~fresh)

    def _backtrack(self, rows: Tensor, f: Tensor, predicted: Tensor) -> None:
        """Shrink the step of ``rows`` (quadratic interpolation, within [0.1, 0.5] of it); restart or stop."""
        slope = predicted / self.t  # directional derivative times |d| (negative)
        rise = f - self.f - predicted
        t_quad = -slope * self.t**2 / (2 * rise)
        t_new = torch.where(torch.isfinite(t_quad), t_quad, 0.1 * self.t)
        t_new = torch.minimum(torch.maximum(t_new, 0.1 * self.t), 0.5 * self.t)
        self.t = torch.where(rows, t_new, self.t)
        self.backtracks += rows.long()
        exhausted = rows & (self.backtracks > self.max_backtracks)
        stuck = exhausted & ~(self.rho != 0).any(1)  # already on steepest descent: no step lowers the loss
        self.active &= ~stuck
        self._restart(exhausted & ~stuck)

    def _direction(self, g: Tensor) -> Tensor:
        """Two-loop recursion over each row's ring, newest pair first, for every row at once: ``-H g``."""
        idx = torch.arange(len(g), device=g.device)
        slots = [(self.ptr - 1 - j) % self.m for j in range(self.m)]
        q = -g
        alphas = []
        for slot in slots:
            a = self.rho[idx, slot] * torch.linalg.vecdot(self.s[idx, slot], q)
            q = q - a[:, None] * self.y[idx, slot]
            alphas.append(a)
        r = q * self.h_diag[:, None]
        for slot, a in zip(reversed(slots), reversed(alphas), strict=True):
            beta = self.rho[idx, slot] * torch.linalg.vecdot(self.y[idx, slot], r)
            r = r + (a - beta)[:, None] * self.s[idx, slot]
        return r


class BatchedAdam:
    """Adam on a batch of points (elementwise, hence per row); non-finite rows stop moving."""

    def __init__(self, x: Tensor, lr: float = 0.02, project: Callable[[Tensor], Tensor] | None = None):
        self.opt = torch.optim.Adam([x], lr=lr)
        self.project = project
        self.x = x
        self.active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.evaluations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.rejected = torch.zeros_like(self.evaluations)  # Adam takes every step

    @property
    def best(self) -> Tensor:
        """The current points (Adam keeps no accepted point)."""
        return self.x.detach()

    @torch.no_grad()
    def step(self, x: Tensor, loss: Tensor, grad: Tensor, finite: Tensor) -> None:
        """One Adam step with ``grad``; rows that went non-finite get a zero gradient from now on."""
        self.active &= finite & torch.isfinite(loss)
        self.evaluations += self.active.long()
        x.grad = torch.where(self.active.view(-1, *[1] * (grad.dim() - 1)), grad, 0.0)
        self.opt.step()
        x.grad = None
        if self.project is not None:
            x.copy_(self.project(x))
