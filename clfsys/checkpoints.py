"""A trial's checkpoints on the search's storage: what a whole one holds, finding the newest
whole one, and reading one at a location (an earlier search's, for a warm start).

Each checkpoint folder holds the latest model with its optimizer, the best model so far and
state.json (epoch, history, best, the callbacks' state); search.py's reporter writes them.
"""

from __future__ import annotations

import sys

from clfsys import storage
from clfsys.errors import DataError

CHECKPOINT_FILES = ("state.json", "model.keras", "best.keras")


def at_location(location: str):
    """The checkpoint folder at `location` (a local path or a URI), for Tune."""
    from ray import tune

    fs, path = storage.resolve(location)
    return tune.Checkpoint(path, filesystem=fs)


def check_whole(locations: list[str]) -> None:
    """Refuse, before any trial starts, earlier trials' checkpoints (locations) that are gone or
    incomplete."""
    for location in locations:
        missing = _missing(*storage.resolve(location))
        if missing:
            raise DataError(f"tune.warm_start.continue_top: checkpoint {location} lacks "
                            f"{', '.join(missing)}")


def _missing(fs, folder: str) -> list[str]:
    """The files of CHECKPOINT_FILES that the checkpoint folder `folder` lacks or holds empty
    (a killed upload can leave one half written)."""
    import pyarrow.fs

    present = {info.base_name for info in fs.get_file_info(
        pyarrow.fs.FileSelector(folder, allow_not_found=True)) if info.size}
    return [name for name in CHECKPOINT_FILES if name not in present]


def whole_checkpoints(fs, folder: str) -> list[str]:
    """The checkpoint folders under `folder` that hold every file of CHECKPOINT_FILES, oldest
    first (a killed upload can leave one half written)."""
    import pyarrow.fs

    from clfsys.raykit import CHECKPOINT_PREFIX

    found: dict[str, set[str]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True,
                                                         recursive=True)):
        parts = info.path[len(folder):].strip("/").split("/")
        if len(parts) == 2 and parts[0].startswith(CHECKPOINT_PREFIX) and info.size:
            found.setdefault(parts[0], set()).add(parts[1])
    return sorted(name for name, files in found.items() if set(CHECKPOINT_FILES) <= files)


def recorded_is_whole(checkpoint) -> bool:
    """Runs on the trial's worker before Tune restores `checkpoint` (see
    raykit.restore_only_whole)."""
    if not _missing(checkpoint.filesystem, checkpoint.path.rstrip("/")):
        return True
    print(f"checkpoint {checkpoint.path}, recorded by the search, is gone or incomplete: "
          "looking for the newest whole one", file=sys.stderr)
    return False


def newest_whole():
    """The newest whole checkpoint in this trial's folder on storage, for a trial that Tune
    restarted without one; None for a new trial."""
    from ray import tune

    from clfsys.raykit import continue_checkpoints_after, trial_storage

    fs, trial_dir = trial_storage()
    whole = whole_checkpoints(fs, trial_dir)
    if not whole:
        return None
    continue_checkpoints_after(whole[-1])
    return tune.Checkpoint(f"{trial_dir}/{whole[-1]}", filesystem=fs)
