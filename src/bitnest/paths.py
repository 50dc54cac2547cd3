"""Where the default model and evaluation data live.

Order: an explicit `--data-dir`, then $BITNEST_DATA_DIR, then `../shared` beside the checkout
(where CI has it), then `../shared` beside the current directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import BitnestError

ENV_VAR = "BITNEST_DATA_DIR"
DEFAULT_MODEL = "models/ref-10m"


def _candidates(explicit: str | os.PathLike | None) -> list[Path]:
    if explicit is not None:
        return [Path(explicit)]
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR])]
    checkout = Path(__file__).resolve().parents[2]  # src/bitnest/paths.py -> checkout root
    return [checkout.parent / "shared", Path.cwd().parent / "shared"]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared directory holding `data/` and `models/`; a one-line error if it is missing."""
    tried = _candidates(explicit)
    for p in tried:
        if p.is_dir():
            return p.resolve()
    raise BitnestError(
        f"data directory not found (tried {', '.join(str(p) for p in tried)}); "
        f"pass --data-dir DIR or set {ENV_VAR}=DIR, or point --model at a model directory"
    )


def data_file(rel: str, explicit: str | os.PathLike | None = None) -> Path:
    """`rel` ("data/…" or "models/…") under the data directory. The directory may be the shared folder holding
    `data/` and `models/`, or the `data` folder itself (a user passes the folder that has the files): then
    "data/x" is looked up as "x", and "models/…" beside it. Returns the first candidate that exists (else the
    first one, for the error message)."""
    root = data_dir(explicit)
    head, _, tail = rel.partition("/")
    tries = [root / rel]
    if head == "data":
        tries.append(root / tail)
    elif not (root / head).exists():
        tries.append(root.parent / rel)
    return next((p for p in tries if p.exists()), tries[0])


def default_model(explicit_data_dir: str | os.PathLike | None = None) -> Path:
    p = data_file(DEFAULT_MODEL, explicit_data_dir)
    if not p.is_dir():
        raise BitnestError(f"default model {p} not found; pass --model DIR (a Hugging Face model directory)")
    return p
