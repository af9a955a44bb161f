"""Small helpers shared by test files (imported as ``helpers``: pytest puts ``tests/`` on the path)."""

import pytest


def stop_across_pieces(pieces: list[str]) -> tuple[str, str]:
    """A 4-character stop string made of the last 2 characters of one streamed piece and the first 2 of the next,
    and the answer expected with it (the text before it, right-stripped). Skips when no such stop exists."""
    full = "".join(pieces)
    for k in range(1, len(pieces)):
        at = len("".join(pieces[:k]))
        stop = full[at - 2:at + 2]
        if len(stop) == 4 and full.find(stop) == at - 2 and full[:at - 2].strip():
            return stop, full[:at - 2].rstrip()
    pytest.skip("the tiny model's pieces are too short to build a stop across two of them")
