"""What every benchmark shares: the repository root on sys.path, the bundled model's id, the
evaluation text beside the project, and a fresh SQUEEZE_HOME that reuses the converted model."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "bundled:smollm2-135m"
TEXT = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
VALID = ROOT.parent / "shared/data/wikitext-2/valid.tokens"  # calibration only, never the evaluation text


def isolated_home(prefix: str = "squeeze-bench-") -> Path:
    """A fresh SQUEEZE_HOME sharing the converted bundled model (so nothing else is reused)."""
    from core import paths
    user_models = paths.make_dir(paths.cache_dir() / "models")  # a fresh machine has none yet
    home = Path(tempfile.mkdtemp(prefix=prefix))
    (home / "cache").mkdir()
    (home / "cache" / "models").symlink_to(user_models, target_is_directory=True)
    return home


def eval_settings(a) -> dict:
    """The job's evaluation settings from a benchmark's --text / --max-tokens / --context."""
    return dict(text=str(a.text), max_tokens=a.max_tokens, context=a.context, prompt_tokens=128,
                new_tokens=32, repeats=3)


def run_recipe(label: str, steps: list, ev: dict) -> dict:
    """The result of `squeeze eval MODEL --recipe steps` (apply, save, load back, evaluate), in process."""
    from core.jobs.client import run_inline
    from core.jobs.spec import JobSpec
    r = run_inline(JobSpec(model=MODEL, recipe={"steps": steps}, eval=ev))
    if r.outcome != "done":
        raise SystemExit(f"{label}: {r.error}")
    return r.result
