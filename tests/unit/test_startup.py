"""edgeserve/startup.py: the profile saver (wired to LocalVariant.observe by the composition root)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgeserve.routing.costs import CostProfile
from edgeserve.runtime.calibrate import load_profile, profile_path
from edgeserve.startup import ProfileSaver

SHA = "ab" * 32


def profile(decode_ms: float) -> CostProfile:
    return CostProfile(variant_id="fam:q4_1", prefill_ms_per_token=1.0, decode_ms_per_token=decode_ms,
                       gguf_sha256=SHA, n_threads=2, host="board")


async def test_changes_are_saved_at_most_once_per_interval_and_at_shutdown(tmp_path: Path) -> None:
    live = {"fam:q4_1": profile(10.0)}
    saver = ProfileSaver(lambda: dict(live), tmp_path, interval_s=0.2)
    path = profile_path(tmp_path, SHA, 2, "board")
    task = asyncio.create_task(saver.run())
    try:
        await asyncio.sleep(0.05)
        assert saver.saves == 0 and not path.exists()  # nothing changed: nothing written
        saver.changed()
        await asyncio.sleep(0.05)
        assert saver.saves == 1 and load_profile(path).decode_ms_per_token == 10.0
        live["fam:q4_1"] = profile(12.0)
        saver.changed()
        saver.changed()
        await asyncio.sleep(0.05)
        assert saver.saves == 1 and saver.pending  # within the interval: waits
        await asyncio.sleep(0.25)
        assert saver.saves == 2 and load_profile(path).decode_ms_per_token == 12.0
    finally:
        task.cancel()
    live["fam:q4_1"] = profile(14.0)
    saver.save()  # at shutdown
    assert saver.saves == 3 and load_profile(path).decode_ms_per_token == 14.0
