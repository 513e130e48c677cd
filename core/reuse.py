"""Saved variants as starting points: a recipe whose first steps a saved variant already holds starts
from that variant instead of the base model (adding gptq after a long distill does not distill again).
No torch here: the GUI asks it for its estimate on the GUI thread."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import models, paths
from .models import VARIANT_MANIFEST as MANIFEST


def state_key(model_id: str, base_dir: Path, steps_before: list[dict]) -> str:
    """Names the model as a step receives it: same key, same weights (for calibration caches)."""
    weights = models.weight_files(base_dir)
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    raw = json.dumps([model_id, str(base_dir), stamp, steps_before], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_stamp() -> str:
    """Fingerprint of the engine's source: a variant saved by other code is never reused."""
    from . import __file__ as core_init
    from .about import versions
    h = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode())  # the app's and torch's versions
    for f in sorted(Path(core_init).parent.rglob("*.py")):  # none in a frozen build: the versions decide
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=512)
def _manifest(path: str, mtime_ns: int) -> dict:
    """A variant's manifest, parsed once per version of the file: the GUI's estimate asks on every slider move."""
    return json.loads(Path(path).read_text())


def saved_prefix(model_id: str, base_dir: Path, steps: list[dict]) -> tuple[Path, int, dict] | None:
    """The saved variant that already holds the most leading steps of this recipe: (folder, steps, manifest).

    It must come from the same base weights (state key) and the same engine source; a partial match
    (the first k < n steps) must be plain weights (nothing packed, no runtime transforms), since later
    steps start from the variant as loaded back. A finished match is the whole answer."""
    root = paths.workspace_dir() / "variants"
    best, stamp = None, None
    for d in sorted(root.glob("*/" + MANIFEST), key=lambda f: f.stat().st_mtime, reverse=True) if root.is_dir() else []:
        try:
            man = _manifest(str(d), d.stat().st_mtime_ns)
            done = man["recipe"]["steps"]
            k = len(done)
            if not done or k > len(steps) or done != steps[:k] or (best and k <= best[1]):
                continue
            if k < len(steps) and (man.get("packed") or man.get("runtime")):
                continue
            stamp = stamp or code_stamp()
            if man.get("code") != stamp or man.get("state_key") != state_key(model_id, base_dir, done):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, half-deleted or older: not a candidate
        best = (d.parent, k, man)
    return best


def link_copy(src: Path, out: Path) -> None:
    """A finished variant under a new name: hard links where the file system allows, else copies."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def stamp_manifest(out: Path, fields: dict) -> None:
    """Rewrites the manifest (a new file, not through a hard link shared with the source)."""
    man = {**json.loads((out / MANIFEST).read_text()), **fields}
    f = out / MANIFEST
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(man, indent=2))
    os.replace(tmp, f)
