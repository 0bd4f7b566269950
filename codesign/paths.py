"""Where codesign keeps what outlives one run on this machine.

cache_dir()            $CODESIGN_CACHE_DIR, else $XDG_CACHE_HOME/codesign, else
                       ~/.cache/codesign: the detected host CPU, the tuning cache
tuning_cache(target)   <cache_dir>/tuning/<target key>.sqlite: the tuning records of one
                       CPU (the key names the mcpu and threads), shared by every artifact
                       compiled without --tuning-db, so a task tuned once is not tuned again
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codesign.targets import Target


def cache_dir() -> Path:
    root = os.environ.get("CODESIGN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "codesign"
    )
    return Path(root)


def tuning_cache(target: Target) -> Path:
    return cache_dir() / "tuning" / f"{target.key}.sqlite"
