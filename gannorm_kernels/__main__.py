"""`python -m gannorm_kernels`: prints what this install can do (gannorm_kernels.info)."""

from .info import main

main()
