"""The result of verifying one response, shared by the in-process `verify` and the Scorer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STATUSES = ("ok", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    """One verified response.

    score: 1.0 (passed) or 0.0 (failed, timed out or errored), the RLVR reward (Tülu 3 §6).
    verifier: the canonical dataset name whose verifier ran ("gsm8k", "math", "ifeval", "google_ifeval").
    status: "ok"; "timeout" when the Scorer killed the verification at its deadline; "error" when the
        verifier raised or its worker died (the score is then 0).
    details: per-instruction results of google_ifeval (score = all of them), else None.
    elapsed_s: seconds spent verifying (wall clock, inside the worker; 0 where not measured).
    message: for "error"/"timeout", what happened (exception type and text), else "".
    """

    score: float
    verifier: str
    status: Literal["ok", "timeout", "error"]
    details: tuple[bool, ...] | None = None
    elapsed_s: float = 0.0
    message: str = ""
