"""`python -m MedDiffusionLib`: the `meddiffusion` command line."""
import sys

from .cli import main

sys.exit(main())
