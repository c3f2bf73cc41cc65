"""`python -m fastprompt` is `python -m fastprompt.train`."""
import sys

from .train import main

sys.exit(main())
