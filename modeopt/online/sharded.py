"""``OnlineCMD`` on a model sharded by FSDP2 (``fully_shard``): every rank models its own shards.

``modeopt.OnlineCMD(model, ...)`` returns a :class:`ShardedOnlineCMD` when the model was sharded by
``fully_shard`` (as ``CMDOptimizer`` returns its sharded class). Every rank builds it on the same
model and calls :meth:`~ShardedOnlineCMD.update` after every optimizer step, together: the fit and
each sample are collective.

* recording: every ``snapshot_every`` calls each rank records its local shards (``p.to_local()``),
  ``(T, N/world)``, in the :class:`~modeopt.trajectories.snapshots.SnapshotBuffer` a single process uses; whether
  any rank's shards hold NaN/inf is all-reduced (4 bytes) so that every rank skips the same snapshots;
* the fit: :func:`~modeopt.distributed.sharded_switch.decompose_shards` gives the modes, reference rows and labels
  a single process gets from :func:`~modeopt.decompose`, each rank holding its rows' labels only; the
  window is replayed into the moments from the shared ``(M, T)`` reference trajectories;
* every ``sample_every`` calls: each reference weight lives on one rank's shard; one all-reduce of the
  M reference values (float32, 4 M bytes; float64 for float64 parameters; zeros elsewhere, so the sum
  is exact) gives every rank ``r``, then each rank updates its per-mode moments (the same on every
  rank) and its own rows' moments (:func:`~modeopt.online.running_moments.welford_step`).

Per rank after the fit: 17 bytes per local weight (mean, co-moment, uint8 label) + 16 M. The
modelled tensors are the sharded parameters (FSDP2 does not shard buffers: they are not modelled).
Checkpoints: :func:`save` / :func:`load` (``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.trajectories.layout import ParamLayout, select_parameters
from .running_moments import MomentsPhase, cmd_weights, first_nonfinite, gather, gather_plan, welford_step
from .shadow_checkpoint import check_online_settings
from modeopt.distributed.sharded_switch import decompose_shards
from modeopt.distributed.sharding import ShardMap
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["ShardedOnlineCMD", "save", "load"]

#: OnlineCMD methods that the FSDP2 path does not offer, and why.
UNSUPPORTED = {
    "averaged_model": "a deep copy of an FSDP2 module is not supported; use cmd_state_dict() (DTensors) or applied()",
    "hand_off": "gradual embedding (OnlineCMDOptimizer) is not supported under FSDP2",
    "freeze_tensor": "gradual embedding (OnlineCMDOptimizer) is not supported under FSDP2",
}


def save(checkpoint_id: Any, online: ShardedOnlineCMD) -> None:
    """``dcp.save({"online": online.state_dict()})`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"online": online.state_dict()}, checkpoint_id=checkpoint_id)


def load(checkpoint_id: Any, online: ShardedOnlineCMD) -> None:
    """Resume ``online`` (built as in the saved run, on any world size: DCP reshards) from :func:`save`'s checkpoint."""
    import torch.distributed.checkpoint as dcp

    head = {"online": {"meta": ""}}
    dcp.load(head, checkpoint_id=checkpoint_id)
    meta = json.loads(head["online"]["meta"])
    template = online.template(meta)
    dcp.load({"online": template}, checkpoint_id=checkpoint_id)
    online.load_state_dict(template)


def _as_dtensor(local: Tensor, like: Tensor, extra: tuple[int, ...] = ()) -> Tensor:
    """``local`` (this rank's rows of a tensor shaped ``extra + like.shape``) as a DTensor sharded like
    ``like`` (on dim ``len(extra)``)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = extra + tuple(like.shape)
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return DTensor.from_local(local, like.device_mesh, [Shard(len(extra))], run_check=False, shape=torch.Size(shape),
                              stride=tuple(reversed(stride)))


def _local(x: Tensor) -> Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


class ShardedOnlineCMD(MomentsPhase):
    """:class:`~modeopt.OnlineCMD` for an FSDP2 model (build it through ``modeopt.OnlineCMD``).

    Same arguments and attributes as OnlineCMD, for this rank's rows: ``labels``, ``mean``,
    ``comoment`` are per modelled parameter, flat, of its *local shard's* size; ``reference_rows``
    the M references' global rows (single-process numbering); ``mode_mean``, ``mode_m2`` identical on
    every rank. ``names=`` may choose sharded parameters only. Not offered: :data:`UNSUPPORTED`.
    """

    def __init__(self, model: nn.Module, *, n_modes: int = 10, fit_at: int, snapshot_every: int = 1,
                 sample_every: int | None = None, n_samples: int = 1000, seed: int | None = None,
                 names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
                 max_snapshots: int | None = None, record_dtype: torch.dtype = torch.float32):
        check_online_settings(n_modes=n_modes, fit_at=fit_at, snapshot_every=snapshot_every, n_samples=n_samples,
                              sample_every=sample_every, max_snapshots=max_snapshots, seed=seed,
                              record_dtype=record_dtype)
        from torch.distributed.tensor import DTensor

        chosen = select_parameters(model, names)
        plain = [n for n, t in chosen if not isinstance(t, DTensor)]
        if plain:
            raise TypeError(f"modeopt: under FSDP2 OnlineCMD models sharded parameters only; {plain[:5]} are not "
                            "DTensors (buffers and parameters outside fully_shard are not sharded): leave them out "
                            "of names= (docs/scaling-out.md)")
        self.model = model
        self.n_modes, self.fit_at, self.snapshot_every = n_modes, fit_at, snapshot_every
        self.sample_every = snapshot_every if sample_every is None else sample_every
        self.n_samples, self.seed = n_samples, int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self._names = [n for n, _ in chosen]
        self._params = [t for _, t in chosen]
        self.shards = ShardMap(self._params)
        if n_modes > self.shards.n_global:
            raise ValueError(f"n_modes={n_modes} > the {self.shards.n_global} weights modelled: ask for fewer modes")
        self._local_layout = ParamLayout.from_named_tensors(list(zip(self._names, self.shards.local_views())))
        self._ref_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self._capacity, self._record_dtype = min(fit_at // snapshot_every, max_snapshots or fit_at), record_dtype
        self._buffer: SnapshotBuffer | None = self._new_buffer()
        self.skipped_snapshots, self._record_pending = 0, False
        self.phase, self.calls, self.count = "recording", 0, 0
        self.labels: list[Tensor] = []
        self.mean: list[Tensor] = []
        self.comoment: list[Tensor] = []
        self.reference_rows: list[int] = []
        f64 = dict(dtype=torch.float64, device=self.shards.device)
        self.mode_mean, self.mode_m2 = torch.zeros(0, **f64), torch.zeros(0, **f64)
        self._ref_plan: tuple | None = None
        self.history: list[dict[str, Any]] = []

    def _new_buffer(self) -> SnapshotBuffer:
        return SnapshotBuffer(self.shards.n_local, dtype=self._record_dtype, capacity=self._capacity)

    def __getattr__(self, name: str) -> Any:
        if name in UNSUPPORTED:
            raise NotImplementedError(f"modeopt: OnlineCMD.{name} under FSDP2: {UNSUPPORTED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def names(self) -> list[str]:
        """Names of the modelled parameters, in layout order."""
        return self._names

    @property
    def tensors(self) -> list[Tensor]:
        """This rank's local shards of the modelled parameters (``p.to_local()``), in layout order."""
        return [p.to_local() for p in self._params]

    @property
    def reference_device(self) -> torch.device:
        """Where the per-mode state and every rank's moments live: the local shards' device."""
        return self.shards.device

    # -------------------------------------------------------------------- per step
    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step, on every rank (collective at recorded snapshots, the fit
        and each sample). A fit that cannot be made (NaN/inf) is reported with a warning and retried."""
        self.calls += 1
        if self.phase == "recording":
            if self.calls % self.snapshot_every == 0 or self._record_pending:
                self._record()
            if self.calls >= self.fit_at:
                self._fit()
        elif self.calls % self.sample_every == 0:
            self.add_sample()

    @torch.no_grad()
    def add_sample(self) -> None:
        """Fold the weights' current values into the moments now (collective: one all-reduce of M values)."""
        self.check_fitted()
        dr_after = self._mode_sample(self.references_now())
        welford_step(self.shards.local_views(), self.mean, self.comoment, self.labels, dr_after, self.count)

    def _nonfinite_anywhere(self) -> str | None:
        """The first local tensor holding NaN/inf, or (if only another rank's shards do) a note saying so:
        one all-reduce of one int32, so that every rank takes the same decision."""
        bad = first_nonfinite(self._names, self.shards.local_views())
        flag = self.shards.all_reduce(torch.tensor([0 if bad is None else 1], dtype=torch.int32))
        if int(flag) == 0:
            return None
        return bad if bad is not None else "a tensor's shard on another rank"

    _WHO, _WHERE = "OnlineCMD (FSDP2)", " on any rank"

    def _nonfinite_snapshot(self) -> str | None:
        return self._nonfinite_anywhere()

    def _append_snapshot(self) -> None:
        self._buffer.append(self._local_layout, self.shards.local_views(), self.calls)

    def _fit(self) -> None:
        bad = self._nonfinite_anywhere()
        if bad is not None:
            warnings.warn(f"OnlineCMD cannot fit at step {self.calls}: {bad!r} holds NaN/inf. Training goes on "
                          "(this is a shadow model); the fit is retried at the next step", stacklevel=3)
            return
        self.seed = int(self.shards.broadcast(torch.tensor([self.seed], dtype=torch.int64)))  # rank 0's
        data, steps = self._buffer.raw()
        traj = Trajectory(data, self._local_layout, steps, self._buffer.anchor)
        try:
            d = decompose_shards(traj, self.shards, self.shards.numels, n_modes=self.n_modes,
                                 n_samples=self.n_samples, seed=self.seed, progress=False)
        except ValueError as e:  # raised on every rank alike (the inputs of each check are shared)
            warnings.warn(f"OnlineCMD cannot fit at step {self.calls}: {e}. Training goes on; the fit is retried "
                          "at the next step", stacklevel=3)
            return
        m = d.n_modes
        self._start(d.labels, d.reference.tolist(), m)
        dev = self.shards.device
        order = sorted(range(len(steps)), key=lambda j: steps[j])
        drs = [self._mode_sample(d.profiles[:, j].to(dev)) for j in order]  # the same reference values as one process
        anchor = None if traj.offset is None else traj.offset.to(dev)
        for k, j in enumerate(order):
            row = data[j].to(dev).to(torch.float32)
            if anchor is not None:
                row = row + anchor
            kernels.welford(self.shards.split(row), self.mean, self.comoment, self.labels, drs[k], k + 1)
        self._buffer = None
        self.phase = "fitted"
        self.history.append({"step": self.calls, "n_modes": m, "sizes": d.sizes.tolist(), "window": len(steps)})

    def _start(self, labels: Tensor, reference_rows: list[int], m: int) -> None:
        """Enter the fitted phase with this rank's ``(n_local,)`` labels and the references' global rows
        (zero moments)."""
        dev = self.shards.device
        ldt = kernels.label_dtype(m)
        self.labels = [x.to(device=dev, dtype=ldt).contiguous() for x in self.shards.split(labels)]
        self.mean = [torch.zeros(n, dtype=torch.float64, device=dev) for n in self.shards.local_numels]
        self.comoment = [torch.zeros(n, dtype=torch.float64, device=dev) for n in self.shards.local_numels]
        self.reference_rows, self.n_modes, self.count = list(reference_rows), m, 0
        self.mode_mean = torch.zeros(m, dtype=torch.float64, device=dev)
        self.mode_m2 = torch.zeros(m, dtype=torch.float64, device=dev)
        self._ref_plan = None

    def _mode_sample(self, r: Tensor) -> Tensor:
        self.count += 1
        dr = r - self.mode_mean
        self.mode_mean += dr / self.count
        dr_after = r - self.mode_mean
        self.mode_m2 += dr * dr_after
        return dr_after

    def references_now(self) -> Tensor:
        """``(M,)`` float64: the reference weights' values now, the same on every rank (collective: one
        all-reduce of M values in the parameters' dtype, float32 or float64; no host sync)."""
        dev = self.shards.device
        if self._ref_plan is None:  # which references this rank holds, and where in its shards
            owned, local = self.shards.to_local(torch.tensor(self.reference_rows, dtype=torch.int64))
            spans = [(t, o, o + n) for t, (o, n) in enumerate(zip(self.shards.local_offsets, self.shards.local_numels))]
            ref_index = [next((t, row - lo) for t, lo, hi in spans if lo <= row < hi) for row in local.tolist()]
            modes = torch.nonzero(owned).flatten().to(dev)
            plan = gather_plan(ref_index, self.shards.local_views(), dev) if ref_index else None
            self._ref_plan = (modes, plan)
        modes, plan = self._ref_plan
        buf = torch.zeros(self.n_modes, dtype=self._ref_dtype, device=dev)
        if plan is not None:
            buf.index_copy_(0, modes, gather(self.shards.local_views(), plan, dev).to(self._ref_dtype))
        return self.shards.all_reduce(buf).to(torch.float64)

    def reference_variance(self) -> Tensor:
        """``(M,)`` float64: each reference's variance over the samples so far."""
        return self.mode_m2 / max(self.count, 1)

    # -------------------------------------------------------------------- results
    def coefficients(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per modelled parameter, for this rank's rows (flat): labels, ``a`` and ``b`` (float64)."""
        self.check_fitted()
        a, b = [], []
        for mean, com, lab in zip(self.mean, self.comoment, self.labels):
            idx = kernels.as_index(lab)
            var = self.mode_m2[idx]
            a.append(torch.where(var > 0, com / var.clamp(min=1e-300), torch.zeros_like(com)))
            b.append(mean - a[-1] * self.mode_mean[idx])
        return self.labels, a, b

    def local_state_dict(self) -> dict[str, Tensor]:
        """This rank's CMD weights: per modelled parameter its local shard's values (plain tensors shaped
        like ``p.to_local()``). Collective after the fit (it reads the references)."""
        views = [p.to_local() for p in self._params]
        if self.phase != "fitted":
            return {n: v.detach().clone() for n, v in zip(self._names, views)}
        return cmd_weights(self._names, views, self.mean, self.comoment, self.labels, self.mode_m2,
                           self.references_now() - self.mode_mean, set())

    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights as DTensors with the parameters' mesh, placements and global shapes (each rank
        holds its shards): ``model.load_state_dict(..., strict=False)`` loads them, ``full_tensor()``
        gathers one. Before the fit, the raw weights. Collective."""
        return {n: _as_dtensor(x, p) for (n, x), p in zip(self.local_state_dict().items(), self._params)}

    def load_into(self, model: nn.Module | None = None) -> None:
        """Write the CMD weights into the local shards of ``model``'s (default: the tracked model's)
        parameters of the same names, in place (collective)."""
        target = dict((model if model is not None else self.model).named_parameters())
        with torch.no_grad():
            for name, x in self.local_state_dict().items():
                target[name].to_local().copy_(x)

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily put the CMD weights into the tracked model's shards, then restore the raw ones
        exactly. Yields the model (collective on entry)."""
        raw = [p.to_local().detach().clone() for p in self._params]
        self.load_into()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, x in zip(self._params, raw):
                    p.to_local().copy_(x)


    # -------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        buf = None if self._buffer is None else self._buffer.state_dict()
        return {"version": 1, "kind": "ShardedOnlineCMD", "phase": self.phase, "calls": self.calls, "seed": self.seed,
                "names": list(self._names), "n_modes": self.n_modes, "count": self.count, "history": self.history,
                "skipped_snapshots": self.skipped_snapshots, "reference_rows": list(self.reference_rows),
                "world": self.shards.world, "record_dtype": str(self._record_dtype),
                "steps": None if buf is None else buf["steps"], "record_count": None if buf is None else buf["count"],
                "anchor": buf is not None and buf["anchor"] is not None}

    def state_dict(self) -> dict[str, Any]:
        """DCP-ready: ``"meta"`` (JSON), and per modelled parameter DTensors sharded like it: the window
        ``"record"`` (``(T, *shape)``, ``"anchor"`` for a low-precision one) before the fit, ``"labels"``,
        ``"mean"``, ``"comoment"`` after it with the replicated ``"mode_mean"``, ``"mode_m2"``."""
        out: dict[str, Any] = {"meta": json.dumps(self._meta())}
        shapes = [tuple(p.to_local().shape) for p in self._params]
        if self._buffer is not None:
            buf = self._buffer.state_dict()
            data, k = buf["data"], buf["data"].shape[0]
            out["record"] = {str(j): _as_dtensor(data[:, o:o + n].reshape(k, *s), p, (k,)) for j, (o, n, s, p) in
                             enumerate(zip(self.shards.local_offsets, self.shards.local_numels, shapes, self._params))}
            if buf["anchor"] is not None:
                out["anchor"] = {str(j): _as_dtensor(x.view(s), p) for j, (x, s, p) in
                                 enumerate(zip(self.shards.split(buf["anchor"]), shapes, self._params))}
        if self.phase == "fitted":
            for key in ("labels", "mean", "comoment"):
                out[key] = {str(j): _as_dtensor(x.view(s), p) for j, (x, s, p) in
                            enumerate(zip(getattr(self, key), shapes, self._params))}
            out["mode_mean"], out["mode_m2"] = self.mode_mean, self.mode_m2
        return out

    def template(self, meta: dict[str, Any]) -> dict[str, Any]:
        """A :meth:`state_dict` of the saved structure (zeros), for DCP to load into (see :func:`load`)."""
        self._check_meta(meta)
        dev, shapes = self.shards.device, [tuple(p.to_local().shape) for p in self._params]
        out: dict[str, Any] = {"meta": json.dumps(meta)}
        if meta["phase"] == "recording":
            k = len(meta["steps"])
            out["record"] = {str(j): _as_dtensor(torch.zeros(k, *s, dtype=self._record_dtype), p, (k,))
                             for j, (s, p) in enumerate(zip(shapes, self._params))}
            if meta["anchor"]:
                out["anchor"] = {str(j): _as_dtensor(torch.zeros(s), p) for j, (s, p) in enumerate(zip(shapes, self._params))}
            return out
        ldt = kernels.label_dtype(meta["n_modes"])
        for key, dt in (("labels", ldt), ("mean", torch.float64), ("comoment", torch.float64)):
            out[key] = {str(j): _as_dtensor(torch.zeros(s, dtype=dt, device=dev), p)
                        for j, (s, p) in enumerate(zip(shapes, self._params))}
        m = meta["n_modes"]
        out["mode_mean"], out["mode_m2"] = (torch.zeros(m, dtype=torch.float64, device=dev) for _ in range(2))
        return out

    def _check_meta(self, meta: Any) -> None:
        if not isinstance(meta, dict) or meta.get("kind") != "ShardedOnlineCMD" or meta.get("version") != 1:
            raise ValueError("not a sharded OnlineCMD checkpoint (its 'meta' entry is missing or of another kind)")
        if meta["names"] != self._names:
            raise ValueError(f"the checkpoint models {len(meta['names'])} other parameters than this OnlineCMD's "
                             f"{len(self._names)}: build it on the same model with the same names= as the saved run")
        if meta["record_dtype"] != str(self._record_dtype):
            raise ValueError(f"the checkpoint records {meta['record_dtype']}, this OnlineCMD {self._record_dtype}: "
                             "build it with the saved run's record_dtype")
        if meta["phase"] not in ("recording", "fitted"):
            raise ValueError(f"the checkpoint's phase {meta['phase']!r} is unknown: damaged checkpoint")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` saved on this world size, or as DCP loaded it into :meth:`template`
        (any world size: :func:`load`). Checked first on every rank: ``ValueError`` changes nothing (collective)."""
        meta = json.loads(sd["meta"]) if isinstance(sd["meta"], str) else sd["meta"]
        self._check_meta(meta)

        def pieces(key: str, rows: int = 1) -> list[Tensor] | None:  # this rank's rows, if they are its shards'
            xs = [_local(sd[key][str(j)]) if str(j) in sd.get(key, {}) else None for j in range(len(self._names))]
            ok = all(x is not None and x.numel() == rows * n for x, n in zip(xs, self.shards.local_numels))
            return [x.reshape(rows, n) for x, n in zip(xs, self.shards.local_numels)] if ok else None

        problem, buffer = f"the state's shards are not this rank's (saved on {meta['world']} ranks, this run has " \
                          f"{self.shards.world}): load it with modeopt.online.sharded.load, which reshards", None
        if meta["phase"] == "recording":
            rows, anchor = pieces("record", len(meta["steps"])), pieces("anchor") if meta["anchor"] else []
            if rows is not None and anchor is not None:
                buffer = self._new_buffer()
                try:
                    dropped = buffer.load_state_dict({"data": torch.cat(rows, dim=1), "steps": meta["steps"],
                                                      "count": meta["record_count"],
                                                      "anchor": torch.cat(anchor, dim=1)[0] if anchor else None})
                    problem = "its recording holds NaN/inf (never recorded): damaged checkpoint" if dropped else None
                except ValueError as e:
                    problem = str(e)
        else:
            m, got = meta["n_modes"], {k: pieces(k) for k in ("labels", "mean", "comoment")}
            if all(v is not None for v in got.values()):
                labels = torch.cat(got["labels"], dim=1)[0]
                moments = {k: [x[0] for x in got[k]] for k in ("mean", "comoment")}
                bad = (labels.numel() and int(kernels.as_index(labels).max()) >= m) or len(meta["reference_rows"]) != m \
                    or not all(bool(torch.isfinite(x).all()) for x in moments["mean"] + moments["comoment"])
                problem = "labels >= n_modes, references for other modes or NaN/inf moments: damaged checkpoint" \
                    if bad else None
        if int(self.shards.all_reduce(torch.tensor([int(problem is not None)], dtype=torch.int32))):
            raise ValueError(f"this sharded OnlineCMD state does not fit: {problem or 'on another rank'}")
        self.phase, self.calls, self.seed, self.count = meta["phase"], meta["calls"], meta["seed"], meta["count"]
        self.history, self.skipped_snapshots = [dict(h) for h in meta["history"]], meta["skipped_snapshots"]
        self._buffer, self._record_pending = buffer, False
        if meta["phase"] == "fitted":
            self._start(labels, meta["reference_rows"], meta["n_modes"])
            self.count = meta["count"]
            for dst, src in ((self.mean, moments["mean"]), (self.comoment, moments["comoment"])):
                for d, s in zip(dst, src):
                    d.copy_(s)
            self.mode_mean.copy_(sd["mode_mean"])
            self.mode_m2.copy_(sd["mode_m2"])
            kernels.check_labels(self.labels, self.n_modes)
