"""tools/train_net.py's one way through the engine: the launcher chooses the YAML or the LazyConfig flow, above
both; what both read (the command line, ``--register-coco``) lies below both; the engine's modules import each other
without a circle."""

import ast
from pathlib import Path

import pytest

import tood.engine
from tests.conftest import REPO_ROOT
from tood.engine import launcher
from tood.engine.arguments import argument_parser

ENGINE = Path(tood.engine.__file__).parent


def _engine_imports():
    """{module: the engine modules it imports} from the source of ``tood/engine``."""
    graph = {}
    for path in ENGINE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = names & {p.stem for p in ENGINE.glob("*.py")}
    return graph


def test_the_engine_imports_without_a_circle_and_chooses_the_flow_above_both():
    graph = _engine_imports()

    def reaches(start, seen=()):
        return {m for n in graph[start] if n not in seen for m in {n} | reaches(n, (*seen, n))}

    assert all(module not in reaches(module) for module in graph), graph
    flows = {"training", "defaults"}
    assert flows <= graph["launcher"]
    assert not ({"launcher"} | flows) & (reaches("training") | reaches("defaults") | reaches("arguments"))
    assert "arguments" in graph["training"] and "arguments" in graph["defaults"]


@pytest.mark.parametrize(
    "config, eval_only, called",
    [
        ("configs/COCO-Detection/tood_R_50_FPN_1x.yaml", False, ["main_yaml"]),
        ("configs/quickstart_shapes.py", False, ["setup", "do_train"]),
        ("configs/quickstart_shapes.py", True, ["setup", "evaluate_checkpoint"]),
    ],
)
def test_main_runs_the_flow_of_the_config_system(monkeypatch, config, eval_only, called):
    calls = []
    for name in ("main_yaml", "setup", "do_train", "evaluate_checkpoint"):
        monkeypatch.setattr(launcher, name, lambda *a, _name=name: calls.append(_name) or _name)
    args = argument_parser().parse_args(["--config-file", str(REPO_ROOT / config), *(["--eval-only"] * eval_only)])
    assert launcher.main(args) == called[-1]
    assert calls == called
