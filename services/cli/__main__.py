"""`python -m services.cli ...`: the `latent-verbalizer` command without its installed script."""

import sys

from services.cli import main

sys.exit(main())
