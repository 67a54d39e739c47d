"""`python -m app` is `hubline`."""

import sys

from app.cli import main

sys.exit(main())
