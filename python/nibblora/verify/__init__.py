"""`python -m nibblora.verify`: check a merged model against its base + adapter (max |logit diff|, KL).

from nibblora.verify import verify_merge
report = verify_merge("base", "adapter", "merged")     # VerifyReport
print(report.format()); assert report.passed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nibblora._lazy import lazy_exports

if TYPE_CHECKING:
    from nibblora.verify.check import SAMPLE_PROMPTS, VerifyReport, verify_merge
    from nibblora.verify.cli import main

# The check runs models (torch); importing the package does not.
__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        **dict.fromkeys(("SAMPLE_PROMPTS", "VerifyReport", "verify_merge"), "nibblora.verify.check"),
        "main": "nibblora.verify.cli",
    },
)

__all__ = ["SAMPLE_PROMPTS", "VerifyReport", "main", "verify_merge"]
