"""Exact half-precision (bf16/fp16) weights under FSDP2: the shard keeps a frozen base, FSDP2 gathers formed values.

As in :mod:`modeopt.modespace.half`, an embedded bfloat16/float16 parameter's shard is not updated in
place: it keeps its value at the switch (the *base*, with ``r_base``, the ``r`` it holds), and every
value the model computes with is ``round(base + a * (r - r_base)[m])`` - summed in float32, rounded
once to the weight's dtype (:func:`modeopt.modespace.kernels.form`). After any number of steps each
weight is within half an ulp of its exact mode-space value; no byte more per weight is kept
(``r_base`` and ``delta = r - r_base`` are ``M`` floats).

Where the forming happens (torch's FSDP2 surface, measured on torch 2.14.1):

* world size > 1: :class:`FormingAllGather`, installed with the public
  ``FSDPModule.set_custom_all_gather`` on every FSDP unit that manages such a parameter. FSDP2 copies
  each parameter's (padded) shard into its all-gather input buffer and calls the comm with it; the comm
  writes this rank's formed shards over their bases in that buffer (one :func:`~modeopt.modespace.kernels.form`
  call per unit), then all-gathers it as FSDP2's own comm does. So every all-gather - forward, the
  backward re-gather after ``reshard_after_forward=True``, explicit or implicit prefetches - gathers
  formed values; the shard itself is never written. Transient: the formed values of one unit's shards
  (on the all-gather stream, as FSDP2's copy-in).
* world size 1: torch 2.14's FSDP2 does not call the comm there (it copies the shard into the unsharded
  parameter). A forward pre-hook that runs after FSDP2's own forms the unsharded parameters in place
  when FSDP2 has just re-filled them from the shards (a pre-hook ahead of FSDP2's sees whether they
  were sharded), and the units are set to ``reshard_after_forward=False`` (public
  ``FSDPModule.set_reshard_after_forward``), so the backward computes with the same formed tensors
  instead of a re-fill from the bases. (On one rank the unsharded copy is all FSDP2 adds.)

``model.state_dict()`` gives the formed (current) values as DTensors sharded like the parameters;
``model.load_state_dict`` takes current values: equal to the formed ones on every rank (a checkpoint of
this run, loaded after the optimizer's state), the bases stay and the run resumes bit for bit; otherwise
every rank re-bases first (``base = formed``, ``r_base = r``: the function is unchanged) and the loaded
values become the new bases (the decision is one 8-byte all-reduce, so every rank must call it).

APIs of FSDP2 used: public ``FSDPModule.set_custom_all_gather`` (the comm protocol ``allocate(size, *, dtype,
device)`` / ``__call__(output_tensor, input_tensor, group, async_op)``), ``set_reshard_after_forward``,
module forward pre-hooks. Guarded private reads (a fallback each): ``module._get_fsdp_state()._fsdp_param_groups``
(``_fsdp_param_group`` on older torch) for the order of a unit's parameters in its all-gather buffer
(fallback: FSDP2's post-order traversal) and ``._all_gather_comm`` to chain to a comm set before
(fallback: ``dist.all_gather_single``, FSDP2's default). The buffer's size is checked against the layout
derived from that order before anything is written; a mismatch raises instead of forming wrong values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modeopt.modespace import kernels

__all__ = ["FormingAllGather", "ShardedHalf", "forming_supported"]

try:  # the comm protocol's base class (a private module path; the protocol itself is duck-typed)
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather as _AllGatherBase
except ImportError:  # pragma: no cover - other torch layouts
    _AllGatherBase = object


def forming_supported() -> bool:
    """Whether this torch's FSDP2 has the public custom all-gather hook the exact path needs."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return hasattr(FSDPModule, "set_custom_all_gather") and hasattr(FSDPModule, "set_reshard_after_forward")


def _unit_params(unit: nn.Module) -> list[Tensor]:
    """The parameters FSDP2 manages in ``unit``, in the order of its all-gather buffer."""
    try:
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        return [fp.sharded_param for g in groups for fp in g.fsdp_params]
    except AttributeError:  # pragma: no cover - fallback: FSDP2's own traversal (post-order DFS)
        from torch.distributed.fsdp import FSDPModule

        modules: list[nn.Module] = []

        def dfs(m: nn.Module) -> None:
            if m is not unit and isinstance(m, FSDPModule):
                return
            for c in m.children():
                dfs(c)
            modules.append(m)

        dfs(unit)
        out, seen = [], set()
        for m in modules:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


def _inner_comm(unit: nn.Module) -> Any:
    """The all-gather comm set on ``unit`` before ours (None: FSDP2's default)."""
    try:
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
        comm = groups[0]._all_gather_comm
    except (AttributeError, IndexError, TypeError):  # pragma: no cover
        return None
    while isinstance(comm, FormingAllGather):  # ours from an earlier mode space (passing through now)
        comm = comm.inner
    return None if comm is None or type(comm).__name__ == "DefaultAllGather" else comm


class FormingAllGather(_AllGatherBase):
    """FSDP2's all-gather for one unit, forming this rank's half-precision shards in the input first.

    Args:
        owner: the :class:`ShardedHalf` optimizer (out of mode space, or after :meth:`detach`: pass-through).
            Held strongly, as ModeSpace's hooks hold the space: a model whose optimizer object was dropped
            in mode space still computes with its current values.
        unit: the FSDP module. layout: per parameter of the unit in buffer order, ``(j, padded_numel,
            element_size)``: ``j`` its embedded index when it is formed here (else None), the elements of
            its padded shard, the bytes of one of its elements. inner: the comm set before (or None).
    """

    def __init__(self, owner: Any, unit: nn.Module, layout: list[tuple[int | None, int, int]], inner: Any):
        self.owner = owner
        self.unit_name = type(unit).__name__
        self.layout = layout
        self.inner = inner
        self.formed = [j for j, _, _ in layout if j is not None]  #: the embedded indices formed here

    def detach(self) -> None:
        """Form nothing any more (pass every all-gather through)."""
        self.owner = None

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The all-gather output buffer (FSDP2's comm protocol): the comm's set before, else a plain ``empty``."""
        if self.inner is not None:
            return self.inner.allocate(size, dtype=dtype, device=device)
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup,
                 async_op: bool = False):
        owner = self.owner
        if owner is not None and owner.space is not None and owner._half and group.size() == owner.shards.world:
            # (a smaller group: reshard_after_forward=int's re-gather of post-forward shards, formed already)
            owner._form_into(self, input_tensor)
        if self.inner is not None:
            return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
        return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class ShardedHalf:
    """The half-precision part of :class:`~modeopt.cmd_optimizer.sharded.ShardedCMDOptimizer` (a mixin:
    it reads ``model``, ``shards``, ``space``, ``_emb_params``, ``_emb_names``)."""

    # ------------------------------------------------------------ forming
    @torch.no_grad()
    def _form_local(self, js: Sequence[int]) -> list[Tensor]:
        """This rank's formed shards of the embedded parameters ``js``, flat (new tensors)."""
        s = self.space
        views = self.shards.local_views()
        return kernels.form([views[j] for j in js], [s["a"][j] for j in js], [s["labels"][j] for j in js],
                            s["delta"])

    @torch.no_grad()
    def _form_into(self, comm: FormingAllGather, buf: Tensor) -> None:
        """Write this rank's formed shards of ``comm``'s unit over their bases in the all-gather input ``buf``."""
        by_bytes = buf.dtype == torch.uint8  # FSDP2 gathers bytes when the unit's inputs differ in dtype
        expect = sum(n * (es if by_bytes else 1) for _, n, es in comm.layout)
        if buf.dim() != 1 or buf.numel() != expect:
            raise RuntimeError(f"modeopt: FSDP2's all-gather input of a {comm.unit_name} unit holds {buf.numel()} "
                               f"elements, the layout modeopt derived expects {expect}: this torch's FSDP2 is not "
                               "supported for half-precision mode space (keep float32 parameters with a bf16 "
                               "MixedPrecisionPolicy)")
        formed = dict(zip(comm.formed, self._form_local(comm.formed)))
        off = 0
        for j, n, es in comm.layout:
            if j is not None:
                w = formed[j]
                if by_bytes:
                    buf[off: off + w.numel() * es].view(w.dtype).copy_(w)
                else:
                    buf[off: off + w.numel()].copy_(w)
            off += n * (es if by_bytes else 1)
        self._comm_formed.add(id(comm))  # (world size 1: the unsharded parameters are formed already)

    # ------------------------------------------------------------ install / remove
    def _install_half(self) -> bool:
        """Install the forming for the half-precision embedded parameters; False where this torch lacks the
        public hooks (then they are updated in place, as before)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        if not forming_supported():
            return False
        index = {id(p): j for j, p in enumerate(self._emb_params) if j in set(self._half)}
        world = self.shards.world
        self._half_units, self._comm_formed = [], set()
        owners = {}
        for mod in self.model.modules():
            for attr, p in mod.named_parameters(recurse=False):
                if id(p) in index:
                    owners.setdefault(mod, []).append((attr, index[id(p)]))
        for unit in self.model.modules():
            if not isinstance(unit, FSDPModule):
                continue
            params = _unit_params(unit)
            if not any(id(p) in index for p in params):
                continue
            layout = []
            for p in params:
                shape = tuple(p.shape)
                rows = -(-shape[0] // world) if shape else 1
                per_row = 1
                for d in shape[1:]:
                    per_row *= d
                layout.append((index.get(id(p)), rows * per_row, p.element_size()))
            inner = _inner_comm(unit)
            comm = FormingAllGather(self, unit, layout, inner)
            unit.set_custom_all_gather(comm)
            entry = {"unit": unit, "comm": comm, "inner": inner, "pending": False,
                     "params": [(mod, attr, j) for mod, ents in owners.items() for attr, j in ents
                                if any(self._emb_params[j] is q for q in params)]}
            self._half_units.append(entry)
            if world == 1:  # FSDP2 copies the shard without a comm there: form the unsharded params
                unit.set_reshard_after_forward(False, recurse=False)
                self._hooks.append(unit.register_forward_pre_hook(
                    functools.partial(_before_unshard, self, entry, DTensor), prepend=True))
                self._hooks.append(unit.register_forward_pre_hook(
                    functools.partial(_after_unshard, self, entry)))
        for mod, ents in owners.items():
            self._hooks.append(mod.register_state_dict_post_hook(
                functools.partial(_current_values, self, ents)))
            self._hooks.append(mod.register_load_state_dict_pre_hook(
                functools.partial(_load_current_values, self, ents)))
        return True

    def _remove_half(self) -> None:
        """Give every unit its comm back (hooks are removed with the optimizer's)."""
        for entry in getattr(self, "_half_units", []):
            if entry["inner"] is not None:
                entry["unit"].set_custom_all_gather(entry["inner"])
            else:  # FSDP2's default comm is private: ours stays, passing through
                entry["comm"].detach()
        self._half_units = []

    @torch.no_grad()
    def rebase(self) -> None:
        """Write the formed values of the half-precision shards into them and set ``r_base = r``: the model
        computes the same function, later steps are measured from here (each re-base rounds once more)."""
        s = self.space
        if s is None or not self._half:
            return
        views = self.shards.local_views()
        for j, w in zip(self._half, self._form_local(self._half)):
            views[j].copy_(w)
        s["r_base"].copy_(s["applied"])
        s["delta"].zero_()

    def _agree_any(self, local: bool) -> bool:
        """Whether ``local`` holds on any rank (one all-reduce of 8 bytes)."""
        flag = torch.tensor([1 if local else 0], dtype=torch.int64, device=self.shards.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.shards.group)
        self.comm_bytes += 8
        return bool(flag)


def _before_unshard(opt, entry: dict, dtensor_type, module, args) -> None:
    """World size 1, ahead of FSDP2's pre-forward: are the unit's parameters sharded now (FSDP2 will re-fill
    the unsharded ones from the bases)?"""
    entry["pending"] = opt is not None and opt.space is not None and any(
        isinstance(getattr(mod, attr), dtensor_type) for mod, attr, _ in entry["params"])


@torch.no_grad()
def _after_unshard(opt, entry: dict, module, args) -> None:
    """World size 1, after FSDP2's pre-forward: form the unsharded parameters it has just filled."""
    if not entry["pending"] or opt is None or opt.space is None:
        return
    entry["pending"] = False
    if id(entry["comm"]) in opt._comm_formed:  # this torch's FSDP2 did call the comm: formed already
        opt._comm_formed.discard(id(entry["comm"]))
        return
    js = [j for _, _, j in entry["params"]]
    for (mod, attr, j), w in zip(entry["params"], opt._form_local(js)):
        t = getattr(mod, attr)  # FSDP2's unsharded parameter, set on the module by its pre-forward
        shard = opt._emb_params[j].to_local()
        if t is opt._emb_params[j] or t.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr():
            raise RuntimeError(f"modeopt: on one rank this torch's FSDP2 computes with {opt._emb_names[j]}'s "
                               "shard itself (no unsharded copy): half-precision mode space cannot form it there; "
                               "keep float32 parameters with a bf16 MixedPrecisionPolicy")
        t.data.copy_(w.view(t.shape))  # .data: not an autograd-visible change of a parameter


def _local_of(v: Any, p: Tensor, shards) -> Tensor | None:
    """This rank's rows of a loaded value ``v`` for parameter ``p`` (a DTensor sharded like it, or the full
    tensor), flat; None when it does not fit."""
    if not isinstance(v, Tensor) or tuple(v.shape) != tuple(p.shape):
        return None
    if hasattr(v, "to_local"):
        return v.to_local().reshape(-1) if tuple(v.placements) == tuple(p.placements) else None
    lo, hi = shards.row_range(tuple(p.shape), shards.rank)
    return v.reshape(-1)[lo:hi]


def _current_values(opt, entries, module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a module owning half-precision embedded FSDP2 parameters: their formed values,
    DTensors sharded like the parameters."""
    from torch.distributed.tensor import DTensor

    if opt is None or opt.space is None:
        return
    mine = [(attr, j) for attr, j in entries if prefix + attr in state_dict]
    if not mine:
        return
    for (attr, j), w in zip(mine, opt._form_local([j for _, j in mine])):
        p = opt._emb_params[j]
        state_dict[prefix + attr] = DTensor.from_local(w.view(p.to_local().shape), p.device_mesh, p.placements,
                                                       run_check=False, shape=p.shape, stride=p.stride())


def _load_current_values(opt, entries, module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: the values are current ones. Equal to the formed values on every rank: the
    bases stay (the entries are swapped for the parameters themselves); else every rank re-bases first and
    the values load into the bases (collective: one all-reduce of 8 bytes)."""
    if opt is None or opt.space is None:
        return
    mine = [(prefix + attr, j) for attr, j in entries if prefix + attr in state_dict]
    if not mine:
        return
    same = True
    for (key, j), w in zip(mine, opt._form_local([j for _, j in mine])):
        v = state_dict[key]
        local = _local_of(v, opt._emb_params[j], opt.shards)
        same = same and local is not None and v.dtype == w.dtype and torch.equal(local.to(w.device), w)
    if opt._agree_any(not same):
        opt.rebase()
        return
    for key, j in mine:
        state_dict[key] = opt._emb_params[j].detach()
