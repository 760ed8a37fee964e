"""`python -m nibblora.compare`: every fine-tuning method trained on the demo's tiny base with one token budget,
and the table the lesson's claims are judged on, measured.

    from nibblora.compare import compare_methods
    summary = compare_methods("build/compare", quick=True)     # compare.json, compare.md, compare.png
    summary.report["rows"], summary.report["claims"]

plan.py (what is trained), workspace.py (base and data), runner.py (one run, scored), inference.py (generation
speed against the base), estimates.py (the memory calculator's figures), claims.py (verdicts from the numbers),
report.py (JSON / Markdown / console), plot.py (the PNG), tool.py (compare_methods), cli.py.
"""

from nibblora._lazy import lazy_exports
from nibblora.compare.claims import Verdict, judge_claims
from nibblora.compare.plan import Plan, RunSpec

# The training and measuring parts import torch: loaded with the first of these names used.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "CompareSummary": "nibblora.compare.tool",
        "compare_methods": "nibblora.compare.tool",
        "main": "nibblora.compare.cli",
    },
)

__all__ = ["CompareSummary", "Plan", "RunSpec", "Verdict", "compare_methods", "judge_claims", "main"]
