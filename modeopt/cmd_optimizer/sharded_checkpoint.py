"""Sharded checkpoints of a :class:`~modeopt.cmd_optimizer.sharded.ShardedCMDOptimizer` with
``torch.distributed.checkpoint`` (DCP), in every phase, on any world size.

``opt.state_dict()`` is DCP-ready: everything sharded is a DTensor whose global shape follows the
model's parameters, so DCP reshards it when the checkpoint is loaded on another number of ranks:

* ``"meta"``: a JSON string (phase, counters, seed, history, recorded steps, the modes' param groups);
* ``"record"`` (warm-up): per embedded parameter of shape ``S``, its recording ``(T, *S)`` sharded on
  dim 1 like the parameter on dim 0 (a view of this rank's recording: nothing is copied);
* ``"space"`` (mode space): per embedded parameter its ``a`` and labels (shape ``S``, ``Shard(0)``,
  views), and the replicated ``(M,)`` ``r``, ``applied`` and ``r_groups``;
* ``"base"``: the base optimizer's ``state_dict()`` (DTensor moments of FSDP parameters, plain
  tensors for ``r``).

Save: ``dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)``
(or :func:`save`). Load with :func:`load`: DCP loads into a template of the right shapes, and the
template depends on the saved phase, so the meta entry is read first.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.modespace.half import HALF_DTYPES
from modeopt.optim.nonfinite import check_optimizer_state_finite, finite

__all__ = ["ShardedCheckpointing", "save", "load"]


def save(checkpoint_id: Any, model: nn.Module, opt: Any) -> None:
    """``dcp.save({"model": model.state_dict(), "optim": opt.state_dict()})`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=checkpoint_id)


def load(checkpoint_id: Any, model: nn.Module, opt: Any) -> None:
    """Resume ``model`` and ``opt`` (built as in the saved run, on any world size) from :func:`save`'s checkpoint."""
    import torch.distributed.checkpoint as dcp

    head = {"optim": {"cmd": {"meta": ""}}}
    dcp.load(head, checkpoint_id=checkpoint_id)
    meta = json.loads(head["optim"]["cmd"]["meta"])
    opt.prepare_load(meta)
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    if not meta.get("half"):  # written before half-precision weights had frozen bases (or none are half)
        for key in ("base", "r_base"):
            sd["optim"]["cmd"].get("space", {}).pop(key, None)
    dcp.load(sd, checkpoint_id=checkpoint_id)
    # the optimizer first: the model's half-precision values are then compared with the loaded run's own
    # formed values (equal: the frozen bases stay, bit for bit)
    opt.load_state_dict(sd["optim"])
    model.load_state_dict(sd["model"])


def _sharded(local: Tensor, like: Tensor, dim: int, extra: tuple[int, ...] = ()) -> Tensor:
    """``local`` (this rank's rows of a tensor shaped ``extra + like.shape``) as a DTensor sharded like ``like``."""
    from torch.distributed.tensor import DTensor, Shard

    shape = extra + tuple(like.shape)
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return DTensor.from_local(local, like.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=tuple(reversed(stride)))


class ShardedCheckpointing:
    """``state_dict`` / ``load_state_dict`` / ``prepare_load`` of ``ShardedCMDOptimizer``."""

    def _meta(self) -> dict[str, Any]:
        s = self.space
        return {"version": 1, "phase": self.phase, "step": self._step, "phase_step": self._phase_step,
                "cycle": self.cycle, "seed": self.seed, "n_modes": self.n_modes, "names": list(self._emb_names),
                "history": self.history, "recorded_steps": list(self.recorded_steps),
                "r_groups": None if s is None else s["r_groups"].tolist(),
                "base_state": sorted(int(k) for k in self.base.state_dict()["state"]),
                "world": self.shards.world, "skipped_steps": self.skipped_steps,
                # the half-precision embedded tensors, whose frozen bases and r_base the "space" entry holds
                # (absent in checkpoints written before they had bases: their model values are the bases)
                "half": list(self._half)}

    def _local_shape(self, j: int) -> tuple[int, ...]:
        return tuple(self._emb_params[j].to_local().shape)

    def state_dict(self) -> dict[str, Any]:
        """``{"base", "cmd": {"meta", "record", "space"}}``, DCP-ready (module docstring)."""
        cmd: dict[str, Any] = {"meta": json.dumps(self._meta())}
        if self.recording is not None:
            cap = self.recording.shape[0]
            cmd["record"] = {str(j): _sharded(view.view(cap, *self._local_shape(j)), p, 1, (cap,))
                             for j, (p, view) in enumerate(zip(self._emb_params, self._record_views()))}
        if self.space is not None:
            s = self.space
            cmd["space"] = {
                "a": {str(j): _sharded(x.view(self._local_shape(j)), p, 0) for j, (p, x) in
                      enumerate(zip(self._emb_params, s["a"]))},
                "labels": {str(j): _sharded(x.view(self._local_shape(j)), p, 0) for j, (p, x) in
                           enumerate(zip(self._emb_params, s["labels"]))},
                "r": self.r_full(), "applied": s["applied"], "r_groups": s["r_groups"]}
            if self._half:  # the frozen bases (views of the shards: nothing is copied) and the r they hold
                cmd["space"]["r_base"] = s["r_base"]
                cmd["space"]["base"] = {str(j): _sharded(self._emb_params[j].to_local(), self._emb_params[j], 0)
                                        for j in self._half}
        return {"base": self.base.state_dict(), "cmd": cmd}

    def _record_views(self) -> list[Tensor]:
        cap = self.recording.shape[0]
        return [self.recording[:, o : o + n] for o, n in zip(self.shards.local_offsets, self.shards.local_numels)
                ] if cap else []

    def prepare_load(self, meta: dict[str, Any]) -> None:
        """Give this optimizer the structure of a saved one (phase, recording, mode space, base state) with
        placeholder values, so that ``state_dict()`` is a template DCP can load into (see :func:`load`)."""
        self._check_meta(meta)
        if self.space is not None:
            self._leave()
        self.recording, self.recorded_steps = None, []
        if meta["phase"] == "warmup" and meta["recorded_steps"]:
            self.recording = torch.zeros(self.capacity, self.shards.n_local, dtype=torch.float32)
            self.recorded_steps = list(meta["recorded_steps"])
        if meta["phase"] == "embedded":
            r_groups = torch.tensor(meta["r_groups"], dtype=torch.int64)
            n = self.shards.n_local
            self._enter(torch.zeros(n, dtype=torch.int64), torch.zeros(n), r_groups,
                        torch.zeros(r_groups.numel()))
        self.phase = meta["phase"]
        self._init_base_state(set(meta["base_state"]))

    @torch.no_grad()
    def _init_base_state(self, keep: set[int]) -> None:
        """Create the base optimizer's state for its current parameters (a step with zero gradients at
        lr 0, as torch.distributed.checkpoint.state_dict does), then keep only the saved indices'."""
        params = [p for g in self.base.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        lrs = [g["lr"] for g in self.base.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in self.base.param_groups:
            g["lr"] = 0.0 if not isinstance(g["lr"], Tensor) else torch.zeros_like(g["lr"])
        self.base.step()
        for g, lr in zip(self.base.param_groups, lrs):
            g["lr"] = lr
        for i, (p, grad) in enumerate(zip(params, grads)):
            p.grad = grad
            if i not in keep:
                self.base.state.pop(p, None)

    def _local_problem(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> str | None:
        """What is wrong with this rank's part of a loaded ``state_dict`` (NaN/inf anywhere, mode labels out of
        range), or None; reads only this rank's shards (no communication)."""
        def local(t: Any) -> Any:
            return t.to_local() if hasattr(t, "to_local") else t

        cmd = state_dict["cmd"]
        for j, name in enumerate(self._emb_names):
            rec = cmd.get("record", {}).get(str(j)) if meta["phase"] == "warmup" and meta["recorded_steps"] else None
            if rec is not None and not finite([local(rec)[: len(meta["recorded_steps"])]]):
                return f"the checkpoint's recording of {name!r} holds NaN/inf: damaged checkpoint; resume from an intact one"
        if meta["phase"] == "embedded":
            space, m = cmd.get("space", {}), len(meta["r_groups"] or [])
            for key in ("r", "applied"):
                if not finite([space.get(key)]):
                    return f"the checkpoint's {key} holds NaN/inf: damaged checkpoint; resume from an intact one"
            for j in meta.get("half") or []:
                if "base" in space and not finite([local(space["base"][str(j)])]):
                    return (f"checkpoint tensor {self._emb_names[j]!r}: its frozen half-precision base holds NaN/inf: "
                            "damaged checkpoint; resume from an intact one")
            if "r_base" in space and not finite([space["r_base"]]):
                return "the checkpoint's r_base holds NaN/inf: damaged checkpoint; resume from an intact one"
            for j, name in enumerate(self._emb_names):
                a, lab = local(space["a"][str(j)]), local(space["labels"][str(j)])
                if not finite([a]):
                    return (f"checkpoint tensor {name!r}: its coefficients a hold NaN/inf: damaged checkpoint; resume "
                            "from an intact one")
                idx = kernels.as_index(lab.reshape(-1)) if lab.numel() else None
                if idx is not None and (int(idx.min()) < 0 or int(idx.max()) >= m):
                    return (f"checkpoint tensor {name!r} has mode labels outside 0..{m - 1}: damaged checkpoint; "
                            "resume from an intact one")
        skipped = meta.get("skipped_steps", 0)
        if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
            return f"the checkpoint's skipped_steps must be an integer >= 0, got {skipped!r}: damaged checkpoint"
        names = {id(p): n for n, p in self.model.named_parameters()}
        try:  # the base's parameters in a saved phase: per group those not embedded, then its r (see _enter)
            emb = {id(p) for p in self._emb_params}
            r_groups = sorted(set(meta["r_groups"] or []))
            order = [n for gi, g in enumerate(self._orig_params)
                     for n in [names.get(id(p), "?") for p in g if meta["phase"] != "embedded" or id(p) not in emb]
                     + ([f"modeopt_r{r_groups.index(gi)}"] if gi in r_groups else [])]
            check_optimizer_state_finite(state_dict["base"], order)
        except ValueError as e:
            return str(e)
        return None

    def _check_meta(self, meta: Any) -> None:
        keys = ("version", "phase", "step", "phase_step", "cycle", "seed", "names", "history", "recorded_steps",
                "r_groups", "base_state")
        if not isinstance(meta, dict) or meta.get("version") != 1 or any(k not in meta for k in keys):
            raise ValueError("not a sharded CMDOptimizer checkpoint (its 'meta' entry is missing, incomplete or of "
                             "another version): damaged checkpoint")
        if meta["names"] != self._emb_names:
            raise ValueError(f"the checkpoint embeds {len(meta['names'])} other parameters than this optimizer's "
                             f"{len(self._emb_names)}: build the model and CMDOptimizer as in the saved run")
        if meta["phase"] not in ("warmup", "embedded", "exported"):
            raise ValueError(f"the checkpoint's phase {meta['phase']!r} is unknown: damaged checkpoint")
        half = [j for j, p in enumerate(self._emb_params) if p.dtype in HALF_DTYPES]
        if meta["phase"] == "embedded" and "half" in meta and meta["half"] != half:
            raise ValueError(f"the checkpoint holds frozen half-precision bases for the embedded tensors {meta['half']}, "
                             f"this model's half-precision embedded tensors are {half}: the model's dtypes differ from "
                             "the saved run's; build (or cast) it to the same dtype before loading")
        if len(meta["recorded_steps"]) > self.capacity:
            raise ValueError(f"the checkpoint recorded {len(meta['recorded_steps'])} snapshots, this optimizer has room "
                             f"for {self.capacity}: build it with the saved run's warmup_steps and snapshot_every")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` (as loaded by DCP into :meth:`prepare_load`'s template, or saved whole
        on the same world size)."""
        cmd = state_dict["cmd"]
        meta = json.loads(cmd["meta"]) if isinstance(cmd["meta"], str) else cmd["meta"]
        self._check_meta(meta)
        # Checked before anything changes, on every rank, and agreed: a rank refusing alone would leave the
        # others waiting for it in the next collective.
        problem = self._local_problem(state_dict, meta)
        where = self._first_bad_anywhere(None if problem is None else 0)
        if where is not None:
            raise ValueError(problem or "the checkpoint is damaged in another rank's part (NaN/inf, or mode labels out "
                             "of range, in its shards): nothing was loaded, on any rank; resume from an intact one")
        if (self.phase != meta["phase"] or (self.space is None) != (meta["phase"] != "embedded")
                or len(self.recorded_steps) != len(meta["recorded_steps"])):
            self.prepare_load(meta)
        with torch.no_grad():
            if self.recording is not None:
                for j, view in enumerate(self._record_views()):
                    src = cmd["record"][str(j)]
                    _copy(view, src.to_local() if hasattr(src, "to_local") else src)
            if self.space is not None:
                s = self.space
                for j in range(len(self._emb_params)):
                    for key in ("a", "labels"):
                        src = cmd["space"][key][str(j)]
                        _copy(s[key][j], (src.to_local() if hasattr(src, "to_local") else src).reshape(-1))
                for idx, r in zip(s["group_modes"], s["r_params"]):
                    r.copy_(cmd["space"]["r"][idx])
                _copy(s["applied"], cmd["space"]["applied"])
                s["r"] = self.r_full()
                if self._half and "base" in cmd["space"]:
                    views = self.shards.local_views()
                    for j in self._half:
                        src = cmd["space"]["base"][str(j)]
                        _copy(views[j], (src.to_local() if hasattr(src, "to_local") else src).reshape(-1))
                    s["r_base"].copy_(cmd["space"]["r_base"])
                else:  # no bases saved: the model's values (loaded before or after this) hold the applied r
                    s["r_base"].copy_(s["applied"])
                s["delta"].copy_(s["applied"] - s["r_base"])
                kernels.check_labels(s["labels"], s["n_modes"])
        self.phase, self._step, self._phase_step = meta["phase"], meta["step"], meta["phase_step"]
        self.cycle, self.seed, self.history = meta["cycle"], meta["seed"], meta["history"]
        self.skipped_steps = meta.get("skipped_steps", 0)  # absent in checkpoints saved before it was
        self.recorded_steps = list(meta["recorded_steps"])
        self.base.load_state_dict(state_dict["base"])
        self._fire("loaded")


def _copy(dst: Tensor, src: Tensor) -> None:
    if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
        dst.copy_(src.view(dst.shape) if src.is_contiguous() else src.reshape(dst.shape))
