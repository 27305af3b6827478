"""Every import in the core points down its layers, and only the command line, the top
layer, reaches the Ray layer: the core can be debugged in one process without Ray."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parents[1] / "raydraft"
# Bottom to top: a module may import from lower layers and from its own unit only.
LAYERS = [
    {"seeds", "rows", "config", "local_weights", "sharding", "metrics", "threads"},
    {"models", "data"},
    {"offload", "ema", "rewards", "sampling", "precision"},
    {
        "algorithms",
        "evaluation",
        "evaluation_cache",
        "run_dir",
        "sample_grids",
        "checkpoint",
        "dashboards",
        "explore",
        "trackers",
    },
    {"rollout", "build", "report"},
    {"learner", "embedded"},
    {"trainer"},
    {"bench"},
    {"cli"},
    {"__main__"},
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}
RAY_LAYER = {"ray", "raydraft_ray"}  # imported by the command line only


def unit_of(path: Path) -> str:
    """raydraft/<unit>.py or raydraft/<unit>/...: the unit a module belongs to."""
    parts = path.relative_to(CORE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name or raydraft unit) of every import, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            found.append((node.lineno, parts[1] if parts[0] == "raydraft" else parts[0]))
    return found


MODULES = sorted(p for p in CORE.rglob("*.py") if unit_of(p) != "__init__")


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in MODULES} <= set(LAYER)


def violations(path: Path, unit: str) -> list[str]:
    """The imports of `path` (a module of `unit`) that do not point down."""
    found = []
    for line, name in imports(path):
        where = f"{path.name}:{line} imports {name}"
        if name in RAY_LAYER and unit != "cli":
            found.append(f"{where}: only the command line may reach the Ray layer")
        elif name in LAYER and name != unit and LAYER[name] >= LAYER[unit]:
            found.append(f"{where}, which is not below {unit}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CORE)))
def test_imports_point_down(path):
    assert violations(path, unit_of(path)) == []


def test_the_check_sees_upward_imports_inside_functions(tmp_path):
    copy = tmp_path / "prompts.py"
    copy.write_text(
        (CORE / "data" / "prompts.py").read_text()
        + "\n\ndef late():\n    import ray\n    from raydraft.trainer import Trainer\n"
    )
    found = violations(copy, "data")
    assert len(found) == 2 and "Ray layer" in found[0] and "not below data" in found[1]
