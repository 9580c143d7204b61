"""`python -m ibl_jax.evaluate`: see `ibl_jax.evaluate.cli`."""

import sys

from ibl_jax.evaluate.cli import main

sys.exit(main())
