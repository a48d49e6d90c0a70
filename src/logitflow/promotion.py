"""The promotion gate's decision (pure logic, no MLflow): does a challenger replace the champion?

A challenger wins when it beats the champion's gate metric by more than the margin in the gate's
direction; a tie or a smaller gain keeps the champion. With no champion yet, the challenger must
pass the absolute floor (at least `floor` for higher-is-better, at most `floor` for lower-is-better).
Values measured on different held-out data (or with another tokenizer) are never compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from logitflow.config import GateSettings

Outcome = Literal["promoted", "rejected", "already_champion"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"


def decide(
    challenger: float, champion: float | None, gate: GateSettings, *, comparable: bool = True, force: bool = False
) -> Decision:
    """`comparable`: both values were measured on the same held-out data with the same tokenizer
    (a loss on other data or another vocabulary says nothing about which model is better)."""
    metric, higher = gate.metric, gate.direction == "higher"
    if force:
        return Decision("promoted", f"forced (challenger {metric} = {challenger:.6g})")
    if math.isnan(challenger):
        return Decision("rejected", f"challenger {metric} is NaN")
    if champion is not None and not comparable:
        return Decision(
            "rejected",
            f"not comparable: challenger and champion were evaluated on different held-out data or tokenizers "
            f"({metric} {challenger:.6g} vs {champion:.6g}); use --force to promote anyway",
        )
    if champion is None:
        if gate.floor is None:
            return Decision("promoted", f"no champion yet and no floor set; {metric} = {challenger:.6g}")
        passes = challenger >= gate.floor if higher else challenger <= gate.floor
        relation = "at least" if higher else "at most"
        verdict = "passes" if passes else "does not pass"
        return Decision(
            "promoted" if passes else "rejected",
            f"no champion yet; {metric} = {challenger:.6g} {verdict} the floor ({relation} {gate.floor:.6g})",
        )
    gain = challenger - champion if higher else champion - challenger
    if gain > gate.margin:
        return Decision(
            "promoted",
            f"{metric} {challenger:.6g} beats the champion's {champion:.6g} by {gain:.6g} (> margin {gate.margin:.6g})",
        )
    what = "ties" if gain == 0 else ("is worse than" if gain < 0 else "is within the margin of")
    return Decision(
        "rejected",
        f"{metric} {challenger:.6g} {what} the champion's {champion:.6g} (gain {gain:.6g}, margin {gate.margin:.6g})",
    )
