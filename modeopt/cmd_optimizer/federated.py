"""Federated averaging with :class:`~modeopt.CMDOptimizer`: after a shared warm-up, clients send
their M mode scalars (plus the parameters kept out of the embedding) instead of N weights.

The server is a ``CMDOptimizer`` over the global model whose base optimizer is ``SGD(lr=1)``: a
FedAvg round is then one optimizer step on the *pseudo-gradient* ``p - mean_k p_k`` (FedOpt's
formulation; another base optimizer gives FedAdam & co.). So the server records the global model
every round, decomposes the warm-up rounds and switches to mode space by itself; from then on its
trainable parameters - and so what the clients send and receive - are ``r`` (+ excluded ones).

Because every client weight is ``w_i = a_i r_k[m(i)] + b_i``, averaging the clients' ``r`` is
*exactly* averaging their weights (the map is affine). A client holds a replica of the model in
the same mode space (:func:`replicate`); receiving ``r`` it updates its own weights by
``w += a (r_new - r_old)`` - no weight ever crosses the wire after the switch. The modes themselves
need no transfer either: every client received the same global models during the warm-up and can
decompose them with the server's seed (as DDP ranks do), or the server sends ``labels`` (1 byte)
and ``a`` (4 bytes) per weight once.

See ``examples/federated/fedavg.py`` for a simulation with 8 non-IID MNIST clients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modeopt.modespace.space import ModeSpace
from .optimizer import CMDOptimizer

__all__ = ["payload", "payload_bytes", "server_round", "replicate", "pull"]


def payload(model: nn.Module) -> dict[str, Tensor]:
    """What a client sends (and the server broadcasts): every parameter that requires grad, by name.

    In warm-up all N weights; in mode space the ``modeopt_r*`` scalars and the excluded parameters.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def payload_bytes(state: dict[str, Tensor]) -> int:
    """Bytes of a payload (every tensor's elements times their size), what one transfer carries."""
    return sum(t.numel() * t.element_size() for t in state.values())


@torch.no_grad()
def server_round(opt: torch.optim.Optimizer, client_states: Sequence[dict[str, Tensor]],
                 weights: Sequence[float] | None = None, model: nn.Module | None = None) -> None:
    """Average the clients' payloads (weighted, e.g. by their sample counts) into the global model.

    Sets each trainable parameter's gradient to ``p - weighted_mean(client p)`` and calls
    ``opt.step()``: with ``SGD(lr=1)`` as base optimizer the global parameters become the mean (the
    weights follow ``r`` exactly, in mode space), a CMDOptimizer records the round in warm-up and
    switches after ``warmup_steps`` rounds. ``model``: the global model (default ``opt.model``; give
    it for a plain optimizer, i.e. plain FedAvg).
    """
    model = opt.model if model is None else model
    if not client_states:
        raise ValueError("server_round needs at least one client payload")
    w = torch.tensor([1.0] * len(client_states) if weights is None else list(weights), dtype=torch.float64)
    w = w / w.sum()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mean = sum(float(wk) * s[name].to(torch.float64) for wk, s in zip(w, client_states))
        p.grad = (p.detach().to(torch.float64) - mean).to(p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)


def replicate(opt: CMDOptimizer, model: nn.Module) -> ModeSpace | None:
    """Make ``model`` (the same architecture as ``opt.model``) a client replica of the server.

    Copies the global weights into it and, if the server is in mode space, puts it into the same
    mode space (same modes, ``a`` and ``r``). Returns its :class:`~modeopt.modespace.space.ModeSpace`
    (None in warm-up). Train the replica's trainable parameters (``space.r_params`` + excluded)
    with any optimizer and call ``space.sync()`` after each of its steps; refresh it each round with
    :func:`pull`.
    """
    s = opt.space
    if s is None:
        pull(None, opt, model)
        return None
    params = dict(model.named_parameters())
    missing = [n for n in s.names if n not in params]
    if missing:
        raise ValueError(f"the client model lacks the server's embedded parameters {missing[:3]}")
    space = ModeSpace(model, [(n, params[n]) for n in s.names], s.mode_index(), s.a, s.r_groups,
                      s.r_full().detach(), coef_dtype=s.coef_dtype, a_scale=s.a_scale)
    pull(space, opt, model)
    return space


@torch.no_grad()
def pull(space: ModeSpace | None, opt: CMDOptimizer, model: nn.Module) -> None:
    """Bring a replica to the global state (what a client does with the broadcast ``r``).

    In mode space a real client applies ``w += a (r_new - r_old)`` to its own weights; copying the
    global weights here is the same, up to float rounding, without simulating each client's state.
    """
    glob = dict(opt.model.named_parameters())
    scalars = set(opt.space.r_qualified_names) if opt.space is not None else set()
    for n, p in model.named_parameters():
        if n in glob and n not in scalars:
            p.copy_(glob[n])
    for n, b in opt.model.named_buffers():
        model.get_buffer(n).copy_(b)
    if space is not None:
        r = opt.space.r_full().detach()
        for rp, g in zip(space.r_params, space.groups):
            rp.copy_(r[opt.space.r_groups == g])
        space.r_in_weights.copy_(r)  # the replica's weights (copied above) already hold r
        # bf16/fp16 parameters hold the server's frozen bases (copied above), at the server's r_base
        space.r_base.copy_(opt.space.r_base.to(space.r_base.device))
