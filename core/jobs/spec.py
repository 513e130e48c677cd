"""JobSpec: everything a job needs, plain and JSON-able (it crosses the process boundary)."""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field

from ..evaluate import EvalSettings


@dataclass
class JobSpec:
    model: str
    recipe: dict = field(default_factory=lambda: {"steps": []})
    eval: dict = field(default_factory=lambda: EvalSettings().to_dict())
    kind: str = "eval"                 # eval | export | compare
    export: dict | None = None         # {"out": dir, "quantize": None|"int8"|"int4", "opset": int|None,
                                       #  "graph": "fused"|"portable"}
    compare: dict | None = None        # {"prompt", "new_tokens", "reference"/"variant": {"label", "variant_dir"}}
    parent_id: str | None = None       # export: the eval run whose variant is exported
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    evaluate: bool = True              # eval jobs: measure (False = only build and save the variant)
    reuse: bool = True                 # start from a saved variant holding this recipe's first steps

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(**self.eval)

    def eval_key(self) -> str:
        return self.eval_settings().key()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        return cls(**d)
