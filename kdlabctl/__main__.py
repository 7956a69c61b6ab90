"""``python -m kdlabctl``."""

import sys

from kdlabctl.cli import main

sys.exit(main())
