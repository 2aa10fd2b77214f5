"""The LVLM's answer vocabulary, in one place: the positions an answer names, and the phrases that deny or
claim an anomaly. The model's reply guard (lvlm.py), the LVLM training's scoring (training/lvlm.py) and the
dialogue benchmark's answer checker (bench/dialogue.py) read answers with these same words.
"""

from __future__ import annotations

import re

from lineguard.events import POSITIONS as GRID_POSITIONS

# the 3 x 3 grid's names (lineguard.events), two-word names first: "top left" is read before "top" and "left"
POSITIONS: tuple[str, ...] = tuple(sorted(GRID_POSITIONS, key=lambda name: -len(name.split())))

DENIAL = re.compile(r"\b(no|not|without|free of|zero)\s+(any\s+|an?\s+|visible\s+)?(anomal|defect|flaw|damage)"
                    r"|\b(is|looks|appears)\s+(normal|flawless|perfect|fine|good)\b|\bflawless\b|^no\b")
CLAIM = re.compile(r"\b(there (is|are) (an?|\d+|one|two|several)\s+(\w+\s+)?(anomal|defect|flaw|damage))"
                   r"|\b(is|looks) (anomalous|defective|damaged|broken)\b|^yes\b")


def positions_in(text: str) -> set[str]:
    """The grid positions that `text` (lower case) names."""
    found = set()
    for position in POSITIONS:  # two-word positions first, then blank them out of the text
        if re.search(rf"\b{position}\b", text):
            found.add(position)
            text = re.sub(rf"\b{position}\b", " ", text)
    return found
