"""Draft proposers behind one small interface, chosen by name."""

from __future__ import annotations

from typing import Literal, Protocol

from specserve.contracts import ProposeItem, ProposeOutput
from specserve.sessions import SessionTable

ProposerName = Literal["draft_model", "ngram", "suffix", "hybrid"]


class Proposer(Protocol):
    def propose(self, items: list[ProposeItem]) -> ProposeOutput:
        """Sync each session with its newly committed tokens, then draft up to its budget."""

    def release(self, session_ids: list[str]) -> int:
        """Free sessions; returns how many were held."""

    sessions: SessionTable  # the sessions held, for Info and telemetry


def make_proposer(name: ProposerName, **kwargs) -> Proposer:
    if name == "draft_model":
        from services.drafter.proposers.draft_model import DraftModelProposer

        return DraftModelProposer(**kwargs)
    if name == "ngram":
        from services.drafter.proposers.ngram import NgramProposer

        return NgramProposer(**kwargs)
    if name == "suffix":
        from services.drafter.proposers.suffix import SuffixProposer

        return SuffixProposer(**kwargs)
    if name == "hybrid":
        from services.drafter.proposers.hybrid import HybridProposer

        return HybridProposer(**kwargs)
    raise ValueError(f"unknown proposer {name!r}")
