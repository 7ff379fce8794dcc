"""The project's standing promises about its layout."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plugin_loader_is_kept_out_of_the_library_package():
    # The plugin manager imports every .py under plugins/ by bare file name; the library must be ignored.
    ignored = (REPO / "plugins" / ".airflowignore").read_text().split()
    assert "anthropic_batch/" in ignored


def test_ci_runs_exactly_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()
