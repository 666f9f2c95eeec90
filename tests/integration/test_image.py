"""`make image-test` from the suite: the image built with podman and run for real.

Only when asked (PREFIX_IMAGE_TEST=1): the image build alone takes minutes on a 2-core machine
(pip installs the dependencies inside it) and the suite must stay under 10 minutes. Without
podman the script installs it from apt (root and a Debian mirror); when it cannot, the test skips
with the script's reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.server_process import ROOT

CANNOT_RUN = 2  # docker/image_test.py's exit status when podman cannot be installed

pytestmark = pytest.mark.skipif(
    os.environ.get("PREFIX_IMAGE_TEST") != "1",
    reason="the image test builds the image (several minutes on 2 cores, too slow for the suite's "
    "10-minute budget): run `make image-test`, or PREFIX_IMAGE_TEST=1 pytest tests/integration/test_image.py",
)


def test_the_image_builds_runs_and_matches_prefix_serve() -> None:
    done = subprocess.run(
        [sys.executable, "-B", str(ROOT / "docker" / "image_test.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    print(done.stdout)
    if done.returncode == CANNOT_RUN:
        pytest.skip(done.stderr.strip()[-500:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "image-test: PASSED" in done.stdout and "nothing left behind" in done.stdout
