"""SmolLM2 tests skip, with the reason, where the model or its GGUF reader is not installed."""

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """The folder of the installed SmolLM2-135M GGUF (skips the test when it is missing)."""
    pytest.importorskip("gguf")
    from llmcompile.tools.models import smollm2_folder

    try:
        return smollm2_folder()
    except FileNotFoundError as e:
        pytest.skip(str(e))
