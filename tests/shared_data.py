"""Where the team's shared test data lives (``../shared`` beside the checkout)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def geneval_dir() -> Path:
    """``shared/geneval`` (official GenEval metadata and class names, MIT): never copied into the repo.

    Looked up in ``$FPO_SHARED_DIR``, then ``../shared`` beside the checkout, then ``/work/shared``.
    """
    for base in (os.environ.get("FPO_SHARED_DIR"), ROOT.parent / "shared", Path("/work/shared")):
        if base and (Path(base) / "geneval" / "evaluation_metadata.jsonl").is_file():
            return Path(base) / "geneval"
    raise FileNotFoundError("the shared GenEval data (../shared/geneval/evaluation_metadata.jsonl) is missing; "
                            "set FPO_SHARED_DIR to the folder that holds geneval/")
