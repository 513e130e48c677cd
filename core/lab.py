"""The guided lab of teaching mode: seven steps from the baseline to an exported variant, each
ticked by what the ledger shows the student has done (no self-reporting)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _steps(run: dict) -> list[dict]:
    return (run.get("recipe") or {}).get("steps") or []


def _done_eval_with(pred: Callable[[list[dict]], bool]) -> Callable[[list[dict]], bool]:
    return lambda runs: any(r["kind"] == "eval" and r["status"] == "done" and pred(_steps(r)) for r in runs)


def _has(name: str, **want) -> Callable[[list[dict]], bool]:
    return lambda steps: any(s.get("technique") == name and all(s.get(k) == v for k, v in want.items())
                             for s in steps)


@dataclass(frozen=True)
class LabStep:
    key: str
    title: str
    how: str
    done: Callable[[list[dict]], bool]
    technique: str | None = None  # whose explainer teaching mode opens while this step is next


LAB = (
    LabStep("baseline", "Measure the baseline", "Open the bundled model: the app measures its perplexity, size and "
            "speed once. Every later row is compared with it.", _done_eval_with(lambda s: not s)),
    LabStep("int8", "8-bit weights (rtn)", "Tick rtn, set bits to 8, Run. The file shrinks ~4x; perplexity barely "
            "moves.", _done_eval_with(_has("rtn", bits=8)), "rtn"),
    LabStep("int4", "4-bit weights (rtn)", "Same with bits 4, group size 64. Smaller again; perplexity rises "
            "noticeably: round-to-nearest has hit its limit.", _done_eval_with(_has("rtn", bits=4)), "rtn"),
    LabStep("gptq", "4-bit, calibrated (gptq)", "Untick rtn, tick gptq at 4 bits: the same size as rtn 4-bit, "
            "much closer to the baseline. Compare the two rows. (The bundled recipe 'GPTQ 4-bit (best 4-bit quality)' "
            "adds the settings that bring it within 10 % of the baseline.)", _done_eval_with(_has("gptq", bits=4)), "gptq"),
    LabStep("prune", "Prune half the weights", "Tick magnitude_prune (then wanda or sparsegpt) at 50 %: see which "
            "method keeps perplexity down.",
            _done_eval_with(lambda s: any(x.get("technique") in ("magnitude_prune", "wanda", "sparsegpt") for x in s)),
            "magnitude_prune"),
    LabStep("compare", "Side by side", "In the Side by side tab, pick the baseline and a 4-bit variant, type a "
            "prompt: where do their outputs part?",
            lambda runs: any(r["kind"] == "compare" and r["status"] == "done" for r in runs)),
    LabStep("export", "Export and verify", "Select your best variant, export it to ONNX: the app runs the file "
            "and shows what you would ship.",
            lambda runs: any(r["kind"] == "export" and r["status"] == "done" and (r.get("result") or {}).get("ok", True)
                             for r in runs)),
)


KINDS = ("eval", "compare", "export")  # the ledger rows the checks above read


def progress(runs: list[dict]) -> dict[str, bool]:
    """{step key: done} from the ledger's rows."""
    return {s.key: bool(s.done(runs)) for s in LAB}
