"""A Scorer plugin whose import kills the worker while it starts (exit code 5), as a broken install would."""

import os

os._exit(5)
