"""`python -m training ...` is `python -m training.train ...`."""
import sys

from .train import main

sys.exit(main())
