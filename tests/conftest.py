import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import profiles  # noqa: E402  (beside this file)

profiles.load()


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The qemu-made guest-data matrix of test_guest_read (built once per session)."""
    from test_guest_read import matrix
    return matrix(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """``qemu-img convert -O raw`` of each image of the matrix."""
    from test_guest_read import matrix
    return matrix(tmp_path_factory)[1]
