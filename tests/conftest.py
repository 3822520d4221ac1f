import os
import sys

# tests import the shared oracle as `oracle`
sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET once, when it is first imported (by whichever test imports
# ogpsa first), so set it here: without a GPU the Triton kernels run in interpreter mode.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
