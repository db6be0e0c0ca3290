"""The package's wiring: the public API, no import cycles, and each concept in its own place
(argparse in cli/, tokens in layers/, latents in latents/, loss terms and likelihoods in
objective/, priors in priors/, no unpickling)."""

from __future__ import annotations

import ast
from pathlib import Path

import flexvae

SRC = Path(__file__).resolve().parents[1] / "src" / "flexvae"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that a file imports anywhere (module level or inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flexvae")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("flexvae"):
                continue
            for alias in node.names:  # "from . import layers" imports the module flexvae.layers
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (SRC.parent / Path(*candidate.split("."))).exists()
                          or (SRC.parent / Path(*candidate.split("."))).with_suffix(".py").exists() else target)
    return found - {module}


# ------------------------------------------------------------------ public API, imports
def test_public_api_names_resolve():
    for name in flexvae.__all__:
        assert getattr(flexvae, name) is not None, name
    assert flexvae.load_model.__module__ == "flexvae.checkpoint.rebuild"
    assert flexvae.VAE.__module__ == "flexvae.model"


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        on_stack.discard(node)
        stack.pop()
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [], set(), done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_only_the_cli_knows_argparse():
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
             if "argparse" in p.read_text(encoding="utf-8") and p.parts[-2] != "cli"]
    assert users == []
    library = [p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts]
    assert not [p.name for p in library if any(m.startswith("flexvae.cli") for m in _imports(p))]


def _owner(obj) -> str:
    """The package (or top-level module) of flexvae that defines ``obj``: 'layers', 'objective'...;
    'layers' for a torch.nn module, registered as a token as it is."""
    module = obj.__module__
    return "layers" if module.startswith("torch.nn.") else module.split(".")[1]


def test_each_registered_concept_lives_in_its_package():
    """A token is a layer (layers/, or torch.nn's own), a latent type a latent (latents/), a loss term or a
    likelihood part of the objective (objective/), a prior a prior (priors/): read from the
    registries themselves, so a new registration in the wrong place fails here."""
    from flexvae import build  # noqa: F401  (registers the built-in tokens)
    from flexvae.latents import LATENTS
    from flexvae.objective import LIKELIHOODS, TERMS
    from flexvae.priors.base import PRIORS
    from flexvae.registry import LAYERS

    places = {
        "layers": [t.factory for t in LAYERS],
        "latents": [t.cls for t in LATENTS],
        "objective": [t.factory for t in TERMS] + list(LIKELIHOODS.values()),
        "priors": [t.factory for t in PRIORS],
    }
    for package, registered in places.items():
        # ours and torch.nn's: plugins that other tests register in this process are user code
        registered = [f for f in registered if f.__module__.startswith(("flexvae.", "torch.nn."))]
        assert len(registered) >= 3, package
        misplaced = sorted(f"{f.__module__}.{f.__name__}" for f in registered if _owner(f) != package)
        assert misplaced == [], f"registered as {package} but defined elsewhere: {misplaced}"


def test_nothing_is_unpickled_or_evaluated():
    """No ``eval``/``exec``, no ``pickle``, and every ``torch.load`` passes ``weights_only=True``
    (the two places that read others' weights files: LPIPS and FID backbones)."""
    loads = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "marshal") for n in names), path
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}:{node.lineno}"
            if ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: k.value for k in node.keywords}
                assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
                loads.append(path.name)
    assert sorted(loads) == ["fid.py", "perceptual.py"]
