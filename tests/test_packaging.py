"""The package's metadata: version, licence, type-hint marker."""

import importlib.metadata

import pytest
from conftest import REPO_ROOT, run_without_heavy_imports


def test_version_is_the_installed_distributions():
    import dclip

    assert dclip.__version__ == importlib.metadata.version("dclip")


def test_importing_dclip_is_light():
    import dclip

    output = run_without_heavy_imports("dclip", ("torch", "transformers", "datasets", "numpy", "ultralytics"),
                                       then="print(dclip.__version__)")
    assert output.strip() == dclip.__version__


def test_setup_cfg_reads_the_version_ships_py_typed_and_the_licence():
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    import dclip

    config = setupcfg.read_configuration(str(REPO_ROOT / "setup.cfg"))
    metadata, options = config["metadata"], config["options"]
    assert metadata["version"] == dclip.__version__
    assert metadata["license"] == "Apache-2.0"
    assert "LICENSE" in metadata["license_files"]
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence  # the full text, not a notice
    assert "py.typed" in options["package_data"]["dclip"]
    assert (REPO_ROOT / "dclip" / "py.typed").is_file()
