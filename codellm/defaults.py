"""Where the default model bundle lives."""
from __future__ import annotations

import os
from pathlib import Path

from .bundle_files import BUNDLE_FILES, BundleError

PACKAGED_BUNDLE = Path(__file__).parent / "default"
HOW_TO_GET_A_MODEL = (
    "no model bundle found. Train one with `codellm-train all --recipe default --out MODEL_DIR` "
    "(or fine-tune: `codellm-train code --from BUNDLE --code-data ~/scripts --out MODEL_DIR`), then pass "
    "--model MODEL_DIR or set CODELLM_MODEL=MODEL_DIR."
)


def default_bundle_path() -> Path:
    """$CODELLM_MODEL if set (`default` as on a command line: bundle_arg), else the bundle shipped inside
    the package."""
    env = os.environ.get("CODELLM_MODEL")
    if env:
        return bundle_arg(env)
    if all((PACKAGED_BUNDLE / name).is_file() for name in BUNDLE_FILES):
        return PACKAGED_BUNDLE
    raise BundleError(HOW_TO_GET_A_MODEL)


def bundle_arg(value: str) -> Path:
    """A bundle folder named on a command line or in a setting; `default`, where no folder of that name
    is here, is the model shipped with codellm."""
    path = Path(value).expanduser()
    return PACKAGED_BUNDLE if value == "default" and not path.is_dir() else path
