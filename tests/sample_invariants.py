"""User invariants for the tests, loaded through WARDEN_INVARIANTS as any user's would be."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import msgspec

from shared.invariants import Subject, Verdict, failed, invariant, passed

SECRETS = ("password", "api_key", "BEGIN PRIVATE KEY")


@invariant("no_secrets", version="2")
def no_secrets(subject: Subject) -> Verdict:
    """The proposal's output and patch mention no secret-looking words."""
    text = msgspec.json.encode(subject.proposal.output).decode() + subject.proposal.patch
    found = [word for word in SECRETS if word in text]
    return failed("output mentions secrets", found=found) if found else passed(searched=list(SECRETS))


@invariant("crash_once", expensive=True)
def crash_once(subject: Subject) -> bool:
    """Dies like a power cut the first time it runs (its marker file says whether it has)."""
    marker = Path(os.environ["WARDEN_TEST_CRASH_MARKER"])
    if not marker.exists():
        marker.write_text(str(subject.proposal_id))
        os.kill(os.getpid(), signal.SIGKILL)
    return True
