"""`python -m nibblora.verify`: check a merged model against its base + adapter (max |logit diff|, KL).

    from nibblora.verify import verify_merge
    report = verify_merge("base", "adapter", "merged")     # VerifyReport
    print(report.format()); assert report.passed
"""

from nibblora.verify.check import SAMPLE_PROMPTS, VerifyReport, main, verify_merge

__all__ = ["SAMPLE_PROMPTS", "VerifyReport", "main", "verify_merge"]
