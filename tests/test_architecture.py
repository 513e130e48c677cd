"""The design's promises that code review alone would not keep."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QT = ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6")


def test_core_never_imports_qt():
    offenders = []
    for f in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in QT]
    assert offenders == []


def test_reading_techniques_and_recipes_does_not_load_torch():
    # The GUI builds its sliders from the schema on the GUI thread: that must stay cheap.
    code = ("import sys, core.recipe, core.techniques, core.models, core.ledger, core.jobs.client;"
            "core.techniques.all_techniques(); core.recipe.of(('rtn', {'bits': 4}));"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
