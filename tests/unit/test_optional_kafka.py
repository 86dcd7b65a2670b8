"""aiokafka is optional (`pip install 'streamwarden[kafka]'`): `import streamwarden`, the CLI's help and
the Redis paths work without it, and `streamwarden.kafka` says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = "import sys; sys.modules['aiokafka'] = None\n"  # as if it were not installed


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_import_streamwarden_does_not_need_aiokafka() -> None:
    done = run(
        """
        import streamwarden, sys
        from streamwarden import ReliabilityLayer, ReliabilitySettings
        ReliabilityLayer(None, ReliabilitySettings())
        from streamwarden._cli import main
        assert not any(name.startswith("streamwarden._kafka") for name in sys.modules), sorted(sys.modules)
        assert "streamwarden._runners._kafka" not in sys.modules
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_streamwarden_kafka_without_aiokafka_fails_on_import_naming_the_module() -> None:
    done = run("import streamwarden.kafka\n")
    assert done.returncode != 0
    assert "aiokafka" in done.stderr
