"""A Scorer plugin whose import hangs the worker while it starts, as a stuck import or filesystem would."""

import time

time.sleep(3600)
