"""The package's shape, checked from its source: layers, import cycles, private names, module sizes,
and a core that runs with torch, numpy, scipy and tqdm only (docs/architecture.md says why)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "modeopt"
MAX_LINES = 450

#: third-party packages each layer may import (the standard library is always allowed).
CORE_DEPS = {"torch", "numpy", "scipy", "tqdm"}
LAYER_DEPS = {
    "core": CORE_DEPS | {"triton"},  # triton: only the CUDA kernels, imported when a CUDA tensor needs them
    "analysis": CORE_DEPS | {"matplotlib", "PIL"},
    "integrations": CORE_DEPS | {"transformers", "lightning"},
    "cli": CORE_DEPS,
}
#: which layers each layer may import (layers only look down).
LAYER_MAY_IMPORT = {
    "core": {"core"},
    "analysis": {"core", "analysis"},
    "integrations": {"core", "analysis", "integrations"},
    "cli": {"core", "analysis", "cli"},
}


#: inside the core, which subpackages each one may import besides itself (docs/architecture.md draws it):
#: the mechanism at the bottom, the trainers built on it, and none of the trainers on another.
_BELOW_TRAINERS = {"utils", "trajectories", "decomposition", "modespace", "distributed", "optim"}
PACKAGE_MAY_IMPORT = {
    "utils": set(),
    "trajectories": {"utils"},
    "decomposition": {"utils", "trajectories"},
    "modespace": {"utils", "trajectories", "decomposition"},
    "distributed": {"utils", "trajectories", "decomposition"},
    "optim": {"utils", "trajectories"},
    "cmd_optimizer": _BELOW_TRAINERS,
    "blockwise": _BELOW_TRAINERS,
    "online": _BELOW_TRAINERS,
    "baselines": _BELOW_TRAINERS,
    "analysis": {"utils", "trajectories", "decomposition"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("analysis", "integrations", "cli"):
        return parts[1]
    return "core"


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _trees():
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


TREES = _trees()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """``(imported module, names or None, line)`` for every import, also those inside functions."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, node), [a.name for a in node.names], node.lineno


def _modeopt_edges(module: str):
    for target, names, line in _imports(module):
        if not target.startswith("modeopt"):
            continue
        subs = [f"{target}.{n}" for n in (names or []) if f"{target}.{n}" in MODULES]
        for dep in subs or [target]:
            if dep in MODULES and dep != module:
                yield dep, line


def test_no_import_cycle():
    graph = {m: sorted({d for d, _ in _modeopt_edges(m)}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle (lazy imports count): " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_layers_only_look_down():
    bad = []
    for m in MODULES:
        layer = _layer(m)
        for dep, line in _modeopt_edges(m):
            if _layer(dep) not in LAYER_MAY_IMPORT[layer]:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} ({layer}) imports {dep} ({_layer(dep)})")
    assert not bad, "a layer imports one above it:\n" + "\n".join(bad)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_subpackage_has_a_place():
    """A new subpackage (or top-level module) must be given its place in PACKAGE_MAY_IMPORT."""
    known = set(PACKAGE_MAY_IMPORT) | {"", "integrations", "cli"}
    assert {_package(m) for m in MODULES} <= known, sorted({_package(m) for m in MODULES} - known)


def test_core_packages_only_look_down():
    """Trainers build on the mechanism; the mechanism never reaches up, and no trainer reaches into another."""
    bad = []
    for m in MODULES:
        pkg = _package(m)
        if pkg not in PACKAGE_MAY_IMPORT:
            continue
        for dep, line in _modeopt_edges(m):
            dpkg = _package(dep)
            if dpkg != pkg and dpkg not in PACKAGE_MAY_IMPORT[pkg]:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} ({pkg}) imports {dep} ({dpkg or 'modeopt'})")
    assert not bad, "a subpackage imports one it may not (docs/architecture.md):\n" + "\n".join(bad)


def test_third_party_imports_per_layer():
    std = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for m in MODULES:
        allowed = LAYER_DEPS[_layer(m)]
        for target, _, line in _imports(m):
            top = target.split(".")[0]
            if top and top != "modeopt" and top not in std and top not in allowed:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}")
        if _layer(m) == "core":
            for target, _, line in _imports(m):
                if target.split(".")[0] == "triton":
                    assert m.startswith("modeopt.modespace.kernels"), f"{m}:{line}: triton outside the CUDA kernels"
    # each optional framework is imported by its own integration module only
    for m in MODULES:
        for target, _, line in _imports(m):
            top = target.split(".")[0]
            own = {"transformers": "modeopt.integrations.hf", "lightning": "modeopt.integrations.lightning"}.get(top)
            if own is not None and m != own:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} (only {own} may)")
    # safetensors (state-dict files) is optional everywhere, imported only when such a file is read
    bad = [b for b in bad if not b.endswith(("safetensors.torch", "safetensors"))]
    assert not bad, "imports outside the layer's dependencies:\n" + "\n".join(bad)


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules above {MAX_LINES} lines (split them by job): {big}"


def test_no_private_names_across_modules():
    """No ``from modeopt.x import _name`` and no ``module._name`` through an imported modeopt module."""
    bad = []
    for m in MODULES:
        aliases = set()
        for node in ast.walk(TREES[m]):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(m, node)
                if not target.startswith("modeopt"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and f"{target}.{a.name}" not in MODULES:
                        bad.append(f"{MODULES[m].relative_to(ROOT)}:{node.lineno} imports {target}.{a.name}")
                    if f"{target}.{a.name}" in MODULES:
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("modeopt"):
                        aliases.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(TREES[m]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


#: Private attributes of *other* objects (not ``self``/``cls``) that a module may touch, with the reason.
#: Everything here is either the module's own class seen through another instance, or torch internals
#: for which torch has no public way; a new entry needs a reason as good.
_DDP = ("DistributedDataParallel keeps its parameter list in its reducer and has no public way to change it; "
        "the switch to mode space must, so modeopt.distributed.ddp_reducer (and only it) rebuilds the reducer as DDP's "
        "own __init__ does, listing each internal in its docstring (tests/test_distributed.py pins the behaviour)")
PRIVATE_ALLOWED: dict[str, dict[str, str]] = {
    "modeopt.optim.wrapping": {"_modeopt_hooked": "this module's own marker on the functions it wraps"},
    "modeopt.distributed.ddp_reducer": dict.fromkeys([
        "_build_debug_param_to_name_mapping", "_build_params_for_reducer", "_ddp_init_helper", "_get_active_ddp_module",
        "_get_ddp_logging_data", "_has_rebuilt_buckets", "_register_comm_hook", "_remove_autograd_hooks",
        "_set_comm_hook_name", "_set_static_graph", "_static_graph_delay_allreduce_enqueued",
        "_verify_params_across_processes"], _DDP),
    "modeopt.modespace.kernels.labels": {"_version": "torch's in-place version counter: the only way to know that a label tensor "
                                           "checked once has not changed since (else a pass over N and a host sync per step)"},
    "modeopt.modespace.swapping": {
        "_parameters": "swapping computed weights in and out of a module every forward: setattr accepts only an "
                       "nn.Parameter there, and torch.nn.utils.parametrize writes _parameters the same way"},
    "modeopt.modespace.read_through": {
        "_notice_copy_trained": "the ModeSpace, reached from its autograd function's context"},
    "modeopt.modespace.half": {
        **dict.fromkeys(["_form", "_formed_at", "_is_half", "_owners", "_delta"],
                        "the ModeSpace (of which HalfPrecision is a part) that the module-level hooks serve"),
        **dict.fromkeys(["_C", "_autograd", "_top_saved_tensors_default_hooks"],
                        "torch has no public way to read the saved-tensor hooks already active; the formed-weight "
                        "hooks chain to them (e.g. save_on_cpu) instead of silently replacing them"),
        "_current_graph_task_id": "torch has no public way to ask whether a backward is running (activation "
                                  "checkpointing re-runs a forward there, under its own saved-tensor hooks)"},
    "modeopt.cmd_optimizer.sharded_half": {
        **dict.fromkeys(["_agree_any", "_comm_formed", "_emb_names", "_emb_params", "_form_into", "_form_local", "_half"],
                        "the ShardedCMDOptimizer (of which ShardedHalf is a part) that the module-level hooks and "
                        "the all-gather comm serve"),
        **dict.fromkeys(["_get_fsdp_state", "_fsdp_param_group", "_all_gather_comm"],
                        "FSDP2 has no public way to list a unit's parameters in its all-gather buffer order or to "
                        "read the comm set before; guarded reads with a fallback each, the buffer size checked "
                        "before anything is written (the module docstring lists them)")},
    "modeopt.modespace.on_use": {
        **dict.fromkeys(["_use", "_pinned"], "the ModeSpace that the stand-in of one of its weights forms from"),
        "_C": "torch.overrides documents torch._C.DisableTorchFunctionSubclass as the way a __torch_function__ "
              "runs the plain operation (no public alias)"},
    "modeopt.optim.param_groups": {"_numel_cache": "LBFGS caches its parameters' total size with no public way to drop it; "
                                             "after the switch its parameters are the mode scalars"},
    "modeopt.online.optimizer": {"_raw_entries": "this module's own _RawWhileSwapped, reached from the optimizer"},
}


def _foreign_private_attributes(m: str) -> set[str]:
    own = {n.name for n in ast.walk(TREES[m]) if isinstance(n, ast.ClassDef)}
    found = set()
    for node in ast.walk(TREES[m]):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in {"self", "cls", "ctx"} | own:
            continue
        found.add(node.attr)
    return found


def test_private_attributes_of_other_objects_are_listed():
    bad = {}
    for m in MODULES:
        extra = _foreign_private_attributes(m) - set(PRIVATE_ALLOWED.get(m, {}))
        if extra:
            bad[m] = sorted(extra)
    assert not bad, ("private attributes of objects another module owns (use a public interface, or list them "
                     f"in PRIVATE_ALLOWED with the reason): {bad}")


BLOCKED = ["transformers", "lightning", "pytorch_lightning", "lightning_fabric", "torchvision", "matplotlib", "safetensors", "accelerate", "peft", "sklearn", "PIL",
           "workloads", "mlxtend", "scattertext", "triton"]


CORE_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    import modeopt
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               n_modes=3, warmup_steps=30, snapshot_every=2, n_samples=60)
    x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
    losses = []
    for step in range(50):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.phase == "embedded", opt.phase
    assert opt.trainable_parameters() == 3
    assert losses[-1] < losses[0], losses
    exported = opt.export()
    assert all(p.requires_grad for p in exported.parameters())

    t = torch.linspace(0, 1, 40)
    w = torch.randn(500, 1) * torch.stack([torch.sin(3 * t), t ** 2])[torch.randint(0, 2, (500,))] + torch.randn(500, 1)
    dec = modeopt.decompose(w, n_modes=2, seed=0)
    err = (dec.reconstruct() - w.double()).abs().max().item()
    assert err < 1e-4, err

    shadow = modeopt.OnlineCMD(model, n_modes=2, fit_at=6, snapshot_every=1, n_samples=40)
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        shadow.update()
    assert shadow.cmd_state_dict()

    import modeopt.analysis as A
    spec = A.koopman_spectrum(modeopt.Trajectory.from_matrix(w), delays=4, rank=4)
    assert len(spec.eigenvalues) == 4
    print("OK")
""")


def test_core_runs_with_core_dependencies_only():
    """In a process where every optional package is hidden (as if not installed), the core trains through the
    switch, decomposes and fits an online CMD model, and the analysis computes; none of them gets imported."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {BLOCKED!r}

        class Hide(importlib.abc.MetaPathFinder):
            # as if the blocked packages were not installed: find_spec says None, as torch's probes expect
            def __init__(self, inner):
                self.inner = inner
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    return None
                find = getattr(self.inner, "find_spec", None)
                return None if find is None else find(name, path, target)
            def invalidate_caches(self):
                getattr(self.inner, "invalidate_caches", lambda: None)()

        sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    """) + CORE_SCRIPT + textwrap.dedent(f"""
        leaked = [n for n in {BLOCKED!r} if n in sys.modules]
        assert not leaked, leaked
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-2000:] + res.stderr[-4000:]


def test_importing_changes_no_environment_variable():
    script = textwrap.dedent("""
        import os, pkgutil, importlib
        import torch, torch._inductor  # torch's compiler sets TORCHINDUCTOR_CACHE_DIR on import: torch's doing
        try:
            import lightning.pytorch  # sets PYTORCH_NVML_BASED_CUDA_CHECK on import: lightning's doing
        except ImportError:
            pass
        before = dict(os.environ)
        import modeopt
        for info in pkgutil.walk_packages(modeopt.__path__, "modeopt."):
            importlib.import_module(info.name)
        changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
        print(sorted(changed))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout


def test_every_non_python_file_of_the_package_is_shipped():
    """A file the package reads at run time (the C kernels' source) must be package data, else a
    wheel install silently loses it (found in a core-only install: the fused CPU kernels fell back)."""
    import fnmatch
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    missing = []
    for path in PKG.rglob("*"):
        if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        ok = False
        for package, globs in data.items():
            base = ROOT / Path(*package.split("."))
            if base in path.parents:
                ok |= any(fnmatch.fnmatch(str(path.relative_to(base)), g) for g in globs)
        if not ok:
            missing.append(str(rel))
    assert not missing, f"not listed in [tool.setuptools.package-data] of pyproject.toml: {missing}"


def test_public_names_have_docstrings():
    """Every public module-level function and class, and every public method of a public class, says
    what it does (property setters excepted: the getter's docstring covers them)."""
    missing = []

    def walk(node, prefix: str, path: Path):
        for n in ast.iter_child_nodes(node):
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or n.name.startswith("_"):
                continue
            setter = any(ast.unparse(d).endswith(".setter") for d in n.decorator_list)
            if not setter and ast.get_docstring(n) is None:
                missing.append(f"{path.relative_to(ROOT)}:{n.lineno} {prefix}{n.name}")
            if isinstance(n, ast.ClassDef):
                walk(n, f"{prefix}{n.name}.", path)

    for m, path in MODULES.items():
        walk(TREES[m], "", path)
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)



def test_a_model_pickled_in_mode_space_before_the_move_still_loads():
    """``torch.save(model)`` in mode space pickles the state-dict hooks by module path; before the package
    moved into folders that path was ``modeopt.modespace._drop_r`` / ``_r_not_missing``."""
    import io
    import pickle

    import modeopt.modespace.space as space

    unpickler = pickle.Unpickler(io.BytesIO(b""))
    assert unpickler.find_class("modeopt.modespace", "_drop_r") is space.drop_r_entries
    assert unpickler.find_class("modeopt.modespace", "_r_not_missing") is space.r_never_missing
    assert unpickler.find_class("modeopt.modespace", "ModeSpace") is space.ModeSpace
