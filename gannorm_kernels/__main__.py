"""`python -m gannorm_kernels` (or `python -m gannorm_kernels.info`): prints what this install can do."""

from .info import main

main()
