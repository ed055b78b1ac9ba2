"""CMDOptimizer under DistributedDataParallel: 2 real CPU processes (gloo over 127.0.0.1).

One launch runs every scenario of ``tests/_ddp_worker.py`` on both ranks, the same launch as the
FSDP2 suite's (``tests/_two_ranks.py``: spawning and importing torch is most of the cost); the tests
below read what each rank wrote. Payloads are measured with
a DDP communication hook (:class:`modeopt.distributed.ddp.CommMeter`) on the real DDP reducer.
"""

from __future__ import annotations

import functools
import importlib.util
from itertools import groupby

import pytest
import torch
import torch.distributed as dist

import modeopt
from modeopt.distributed.ddp import attach

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _ddp_worker as worker  # noqa: E402  (tests/ is on sys.path; the spawned ranks import it too)
from _two_ranks import SUITES  # noqa: E402

HAS_HF = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("accelerate") is not None
SCENARIOS = ["sgd", "adamw", "static", "repair", "unattached", "unsupported"] + (["trainer"] if HAS_HF else [])
N_TRAIN = 2000
#: DDP averages two 32-sample mean gradients where one process takes one 64-sample mean: the same
#: sums in another order (float32), so the runs agree to rounding, not bit for bit.
ATOL = 1e-5


@functools.lru_cache(maxsize=1)
def _data() -> tuple:
    """The first N_TRAIN real MNIST training digits and labels."""
    from workloads import mnist_subset

    x, y = mnist_subset()[:2]
    return x[:N_TRAIN].clone(), y[:N_TRAIN].clone()


SUITES["ddp"] = lambda out: ("_ddp_worker", "run_scenarios", (str(out), SCENARIOS, _data()))


@pytest.fixture(scope="module")
def runs(two_rank_launch):
    out = two_rank_launch["ddp"]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    print("\nDDP, per scenario (rank 0): " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in ranks[0].items()))
    return {"ranks": ranks, "reference": worker.single_process_sgd(_data())}


def both(runs, name: str) -> tuple[dict, dict]:
    pair = tuple(r[name] for r in runs["ranks"])
    for rank, res in enumerate(pair):
        if "error" in res:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{res['error']}")
    return pair


def phases(log: list[dict]) -> list[tuple[str, set[int]]]:
    """Consecutive phases with the set of per-step all-reduce payloads (bytes) seen in each."""
    return [(ph, {e["bytes"] for e in g}) for ph, g in groupby(log, key=lambda e: e["phase"])]


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sgd", "adamw", "static", "repair", pytest.param(
    "trainer", marks=pytest.mark.skipif(not HAS_HF, reason="needs transformers and accelerate"))])
def test_all_ranks_hold_identical_weights(runs, name):
    r0, r1 = both(runs, name)
    assert equal_weights(r0["weights"], r1["weights"])  # bit for bit


def test_embedded_allreduce_carries_only_the_mode_scalars(runs):
    r0, r1 = both(runs, "sgd")
    n, m = r0["n_weights"], r0["n_modes"]
    assert n == 29_994 and m == worker.SGD["n_modes"]
    assert phases(r0["log"]) == [("warmup", {4 * n}), ("embedded", {4 * m})]  # 119,976 B -> 32 B per step
    assert {e["calls"] for e in r0["log"]} == {1}  # one all-reduce per step (one bucket)
    assert {e["trainable"] for e in r0["log"][worker.SGD["warmup_steps"]:]} == {m}
    assert r0["log"] == r1["log"]


def test_excluded_parameters_reclustering_export_and_no_sync(runs):
    r0, _ = both(runs, "adamw")
    n, m, b = 29_994, 6, r0["n_bias"]
    assert b == 90
    # find_unused_parameters=True: left alone, DDP would all-reduce N zeros and never r (see docs).
    assert phases(r0["log"]) == [("warmup", {4 * n}), ("embedded", {4 * (m + b)}), ("warmup", {4 * n}),
                                 ("embedded", {4 * (m + b)}), ("exported", {4 * n})]
    assert r0["cycles"] == 2 and [s["agreed"] for s in r0["switches"]] == [True, True]
    assert r0["rebuilds"] == 4  # embed, back to full training, embed, export


def test_static_graph_and_gradient_as_bucket_view(runs):
    r0, _ = both(runs, "static")
    assert phases(r0["log"]) == [("warmup", {4 * 29_994}), ("embedded", {4 * (r0["n_modes"] + r0["n_fc2"])})]


def test_matches_a_single_process_run_on_the_same_global_batch(runs):
    r0, _ = both(runs, "sgd")
    ref = runs["reference"]
    assert r0["seed"] == ref["seed"]
    assert torch.equal(r0["labels"], ref["labels"])  # the same modes
    for k, w in ref["weights"].items():
        torch.testing.assert_close(r0["weights"][k], w, rtol=0, atol=ATOL)


def test_ranks_agree_on_the_seed_and_verify_the_decomposition(runs):
    r0, r1 = both(runs, "sgd")
    assert r0["seed_before"] != r1["seed_before"]  # seed=None drew different seeds on the two ranks
    assert r0["seed"] == r1["seed"] == r0["seed_before"]  # rank 0's wins
    assert torch.equal(r0["labels"], r1["labels"])
    assert r0["switches"] == r1["switches"] == [{"step": worker.SGD["warmup_steps"], "seed": r0["seed"],
                                                 "agreed": True, "repaired": False}]
    assert r0["rebuilds"] == 1


def test_resume_in_mode_space_under_ddp_is_exact(runs):
    r0, r1 = both(runs, "sgd")
    assert equal_weights(r0["resumed"], r0["weights"]) and equal_weights(r1["resumed"], r1["weights"])
    steps = worker.SGD["steps"] - worker.SGD["resume_at"]
    assert r0["resumed_bytes"] == steps * 4 * r0["n_modes"]


def test_disagreeing_ranks_are_detected_and_repaired(runs):
    r0, r1 = both(runs, "repair")
    assert r0["switches"][0]["agreed"] is False and r0["switches"][0]["repaired"] is True
    assert r1["switches"] == r0["switches"]
    assert torch.equal(r0["labels"], r1["labels"])
    assert any("ranks reached different modes" in w for w in r0["warnings"] + r1["warnings"])


def test_without_attach_it_warns_and_the_ranks_drift(runs):
    r0, r1 = both(runs, "unattached")
    assert any("is not attached" in w for w in r0["warnings"])
    assert r0["last_bytes"] == 0  # DDP all-reduced nothing in mode space ...
    assert not torch.equal(r0["r_grad"], r1["r_grad"])  # ... so each rank steps on its own gradient


def test_zero_is_refused_and_fsdp2_gets_the_sharded_optimizer(runs):
    r0, _ = both(runs, "unsupported")
    assert r0["fsdp2"] == "ShardedCMDOptimizer"  # tests/test_fsdp.py tests it
    assert "ZeroRedundancyOptimizer is not supported" in r0["errors"]["zero"]


@pytest.mark.skipif(not HAS_HF, reason="needs transformers and accelerate")
def test_hf_trainer_two_processes(runs):
    r0, r1 = both(runs, "trainer")
    assert r0["world"] == 2 and r0["wrapper"] == "DistributedDataParallel"
    assert r0["phase"] == "embedded" and r0["rebuilds"] == 1 and r0["switches"][0]["agreed"]
    (warm, wb), (emb, eb) = phases(r0["log"])
    assert (warm, emb) == ("warmup", "embedded")
    assert eb == {4 * (r0["n_modes"] + r0["n_classifier"])} and min(wb) > 100 * max(eb)
    assert torch.isfinite(torch.tensor(r0["loss"]))


# ----------------------------------------------------------------- in-process checks
def test_attach_needs_the_cmd_optimizer():
    model = torch.nn.Linear(4, 3)
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, warmup_steps=9,
                               snapshot_every=3, n_samples=10)

    class Wrapper:  # like accelerate's AcceleratedOptimizer
        optimizer = opt

    with pytest.raises(TypeError, match="pass its .optimizer"):
        attach(Wrapper())
    first = attach(opt)
    assert attach(opt) is first  # once per optimizer
    first.detach()
    assert opt._phase_hooks == []
