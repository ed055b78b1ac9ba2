"""The evidence runner's methods on tiny budgets: every method trains, reports sane numbers."""

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "evidence"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from methods import run_one  # noqa: E402
from tasks import make_task  # noqa: E402


def _cfg(name: str, **over) -> dict:
    with open(ROOT / "benchmarks" / "evidence" / "configs" / f"{name}.toml", "rb") as f:
        cfg = tomllib.load(f)
    cfg.update(over)
    return cfg


def test_configs_parse_and_name_a_plain_reference():
    for path in (ROOT / "benchmarks" / "evidence" / "configs").glob("*.toml"):
        cfg = tomllib.loads(path.read_text())
        names = [m["name"] for m in cfg["methods"]]
        assert "plain" in names and len(set(names)) == len(names), path.name


@pytest.fixture(scope="module")
def cnn():
    cfg = _cfg("cnn_mnist", epochs=1.0, eval_every=31, posthoc_modes=[3], online_fit_epochs=0.5, swa_start_epochs=0.5)
    return cfg, make_task(cfg)


def test_plain_with_shadows(cnn):
    cfg, task = cnn
    r = run_one(cfg, task, {"name": "plain", "kind": "plain"}, seed=0)
    assert r["total_steps"] == 62 and [c[0] for c in r["curve"]] == [31, 62]
    assert r["trainable"] == 29_994 and r["switch_step"] is None
    assert 0.8 < r["final"] <= 1
    assert set(r["shadows"]) == {"ema", "ema_best", "swa", "swa_best", "online", "online_best", "posthoc_M3"}
    assert all(0.1 < v <= 1 for v in r["shadows"].values())
    assert r["shadows"]["online_best"] >= r["shadows"]["online"]
    assert [s for s, _ in r["shadow_curves"]["online"]] == [31, 62]  # fitted at step 31, evaluated from then on
    assert r["step_ms"] > 0 and r["peak_mib"] > 100


def test_gradual_embedding_method(cnn):
    cfg, task = cnn
    r = run_one(cfg, task, {"name": "g", "kind": "gradual", "fit_epochs": 0.5, "embed_every_epochs": 0.125,
                            "embed_fraction": 0.3, "granularity": "weight"}, seed=0)
    assert 0 < r["frozen_fraction"] < 1 and 0.5 < r["final"] <= 1 and 0.5 < r["shadow_final"] <= 1


@pytest.mark.parametrize("method, trainable", [
    ({"name": "c", "kind": "cmd", "n_modes": 4, "warmup_epochs": 0.5, "exclude": "1d"}, 4 + 90),
    ({"name": "c", "kind": "cmd", "n_modes": 4, "warmup_epochs": 0.5, "exclude": "none",
      "recluster_every_epochs": 0.125, "recluster_full_epochs": 0.25}, 4),
    ({"name": "d", "kind": "dldr", "dim": 4, "warmup_epochs": 0.5, "exclude": "1d"}, 4 + 90),
])
def test_reduced_methods(cnn, method, trainable):
    cfg, task = cnn
    r = run_one(cfg, task, method, seed=1)
    assert r["switch_step"] == 31 and r["trainable"] == trainable
    assert 0.5 < r["final"] <= 1
    if "recluster_every_epochs" in method:
        # 31 warm-up steps, 8 in mode space, 16 recorded full steps, then mode space again
        assert r["switches"] == [31, 31 + 8 + 16]
    else:
        assert r["switches"] == [31]


def test_lora_on_the_real_minilm():
    pytest.importorskip("peft")
    cfg = _cfg("minilm_reviews", epochs=0.25, n_train=160, n_test=100, eval_every=5)
    task = make_task(cfg)
    r = run_one(cfg, task, {"name": "lora", "kind": "lora", "r": 2, "targets": ["query", "value"]}, seed=0)
    # rank 2 on query/value of 6 layers of width 384, plus the 2-class head (weight + bias)
    assert r["trainable"] == 6 * 2 * 2 * (384 + 384) + (2 * 384 + 2)
    assert r["total_steps"] == 2 and 0 <= r["final"] <= 1
