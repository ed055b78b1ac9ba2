"""Rebuilding a ``DistributedDataParallel``'s gradient reducer over a new set of parameters, in place.

torch has no public way to change the parameter set of an existing DDP wrapper: DDP captures the
parameters that require grad when it is built (buckets, autograd hooks on each one). The switch to
mode space replaces that set (N weights out, M mode scalars in), and the same DDP object must go on
working (the HF ``Trainer`` and Accelerate hold it). So this module repeats the steps
``DistributedDataParallel.__setstate__`` runs when a DDP is unpickled, and is the only place in
modeopt that touches DDP's internals. Every private name used, and why:

* ``ddp._remove_autograd_hooks()`` - drop the old reducer's hooks on the old parameters.
* ``ddp._build_params_for_reducer()`` - the parameters that require grad now, and which expect
  sparse gradients (DDP's own rule, e.g. ``nn.Embedding(sparse=True)``).
* ``torch.distributed._verify_params_across_processes`` - every rank must build the same buckets.
* ``ddp._build_debug_param_to_name_mapping`` - the names DDP's error messages use.
* ``ddp._ddp_init_helper`` - builds the buckets, the C++ reducer and its logger.
* ``ddp.reducer._set_static_graph()``, ``ddp.logger._set_static_graph()`` and
  ``ddp._static_graph_delay_allreduce_enqueued`` - ``static_graph=True`` state, as ``__setstate__``.
* ``ddp._comm_hooks``, ``ddp.logger._set_comm_hook_name``, ``torch.distributed._register_comm_hook``
  - communication hooks (``ddp.register_comm_hook``) registered again on the new reducer, without
  ``register_comm_hook``'s check that none is registered yet.
* ``ddp._has_rebuilt_buckets`` - let DDP re-bucket in the first backward's order, as after build.
* ``ddp._get_ddp_logging_data()`` - the built reducer's tensor count and bytes (is it stale?).
* ``ddp.logger.set_runtime_stats_and_log()``, ``ddp.reducer.prepare_for_forward()`` - prepare
  a reducer rebuilt inside DDP's forward as DDP's ``_pre_forward`` prepared the old one.
* ``DistributedDataParallel._get_active_ddp_module()`` - which DDP's forward is running (to rebuild
  only through a forward that will synchronise gradients).
* ``ddp._use_python_reducer``, ``ddp._delay_all_reduce_params`` - set-ups whose hooks cannot be
  rebuilt this way (refused by :func:`check_rebuildable`).

These names can change between torch releases: ``tests/test_distributed.py`` (two real gloo
processes) exercises every one of them.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["check_rebuildable", "rebuild_reducer", "trainable_signature", "built_signature",
           "prepare_rebuilt_inside_forward", "active_ddp"]

_UNSUPPORTED_DOC = "see docs/scaling-out.md"


def check_rebuildable(ddp: DistributedDataParallel) -> None:
    """Raise ``TypeError`` for DDP set-ups whose gradient hooks :func:`rebuild_reducer` cannot rebuild."""
    problems = []
    if getattr(ddp, "_use_python_reducer", False):
        problems.append("the Python reducer (compiled autograd)")
    if getattr(ddp, "mixed_precision", None) is not None:
        problems.append("DDP's mixed_precision=")
    if getattr(ddp, "_delay_all_reduce_params", None):
        problems.append("delay_all_reduce_named_params=")
    if problems:
        raise TypeError(f"modeopt: DistributedDataParallel with {', '.join(problems)} is not supported "
                        f"(its gradient hooks cannot be rebuilt at the switch; {_UNSUPPORTED_DOC})")


def trainable_signature(ddp: DistributedDataParallel) -> tuple[int, int]:
    """``(tensors, bytes)`` of the parameters that require grad now (what a rebuilt reducer would hold)."""
    params, _ = ddp._build_params_for_reducer()
    return len(params), sum(p.numel() * p.element_size() for p in params)


def built_signature(ddp: DistributedDataParallel) -> tuple[int, int]:
    """``(tensors, bytes)`` that DDP's current reducer was built over (-1 when DDP does not say)."""
    data = ddp._get_ddp_logging_data()
    return int(data.get("num_parameter_tensors", -1)), int(data.get("total_parameter_size_bytes", -1))


def rebuild_reducer(ddp: DistributedDataParallel) -> None:
    """Rebuild DDP's gradient reducer over the parameters that require grad *now*.

    The steps ``DistributedDataParallel.__setstate__`` runs (buckets, autograd hooks, logger),
    plus: the old reducer's hooks are removed, the shapes are verified across ranks (one small
    collective: every rank must call this at the same point), the static-graph state is reset and
    the communication hooks registered with ``ddp.register_comm_hook`` are registered again. No
    parameter is broadcast. Called for you by :func:`modeopt.distributed.attach`.
    """
    check_rebuildable(ddp)
    ddp._remove_autograd_hooks()
    params, sparse = ddp._build_params_for_reducer()
    dist._verify_params_across_processes(ddp.process_group, params, None)
    mapping = ddp._build_debug_param_to_name_mapping(params)
    ddp._ddp_init_helper(params, sparse, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    for hook, state in getattr(ddp, "_comm_hooks", []):
        ddp.logger._set_comm_hook_name(getattr(hook, "__qualname__", hook.__class__.__name__))
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False


def prepare_rebuilt_inside_forward(ddp: DistributedDataParallel) -> None:
    """After :func:`rebuild_reducer` inside DDP's forward (after its ``_pre_forward`` prepared the old
    reducer): prepare the new one the same way, so DDP's ``_post_forward`` can go on with it."""
    if ddp.require_backward_grad_sync:
        ddp.logger.set_runtime_stats_and_log()
        ddp.reducer.prepare_for_forward()


def active_ddp() -> DistributedDataParallel | None:
    """The DDP wrapper whose forward is running now (None outside any DDP forward)."""
    return DistributedDataParallel._get_active_ddp_module()
