"""Entry point for ``python -m dicomai``."""

from __future__ import annotations

import sys

from dicomai.ops.cli import main

sys.exit(main())
