"""`python -m services.cli ...`: the `latent-verbalizer` command without its installed script."""

import sys

from latent_verbalizer.services.cli import main

sys.exit(main())
