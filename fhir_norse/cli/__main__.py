"""``python -m fhir_norse.cli``: the same as the ``fhir-norse`` command."""

import sys

from fhir_norse.cli import main

sys.exit(main())
