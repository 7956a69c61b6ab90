"""``python -m kdlabd``."""

import sys

from kdlabd.daemon import main

sys.exit(main())
