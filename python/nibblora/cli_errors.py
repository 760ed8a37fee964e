"""How every nibblora CLI ends: the summary and exit 0, or one line on stderr and exit 2 for bad input.

return run_tool("nibblora.quantize", lambda: quantize_checkpoint(...))
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from nibblora.errors import NibbloraError


def run_tool(
    prog: str,
    job: Callable[[], Any],
    errors: tuple[type[Exception], ...] = (NibbloraError,),
    interrupted: str = "nothing was written",
) -> int:
    """Run a tool's job and print its summary (`.format()`): exit 0, or the summary's `exit_code` when it has one
    (a finished run whose result the user should not ship unread); one of `errors` (bad input, or an output that
    could not be written) prints one line on stderr and exits 2; Ctrl-C exits 130, saying `interrupted` (what an
    interrupted job leaves behind)."""
    try:
        summary = job()
    except errors as err:
        message = " ".join(str(err).split("\n"))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    print(summary.format())
    return int(getattr(summary, "exit_code", 0))
