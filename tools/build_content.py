"""Build the Norse Feedback FHIR content (terminology, static and adaptive Questionnaires).

    python tools/build_content.py                      # regenerate questionnaires/nf21 + terminology
    python tools/build_content.py mapping --csv PATH   # (once) write mappings/nf21-2.1.0.yaml

The logic lives in :mod:`tools.content_build`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.content_build import main

if __name__ == "__main__":
    raise SystemExit(main())
