import os
import sys

# tests import the shared oracle as `oracle`
sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET once, when it is first imported (by whichever test imports
# ogpsa first), so set it here: without a GPU the Triton kernels run in interpreter mode.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def paper_preset():
    """For tests of the paper recipe: ``OGPSAConfig()`` means ``OGPSAConfig(preset="paper")`` inside
    the test (gradient space, one direction per reference set, stage-default refresh), as the
    library's default was before the rich preset. Use with
    ``pytestmark = pytest.mark.usefixtures("paper_preset")``."""
    import ogpsa.config

    # module scope, so that module-scoped fixtures (a shared training run) see it too; configs built
    # at import time (parametrize arguments) must say preset="paper" themselves
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ogpsa.config, "DEFAULT_PRESET", "paper")
        yield
