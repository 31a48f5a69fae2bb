"""Sphinx configuration of the diode documentation."""

from __future__ import annotations

import diode

project = "diode"
author = "diode developers"
copyright = "diode developers"
release = diode.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Signatures stay readable; types go into the parameter descriptions.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_class_signature = "separated"

exclude_patterns = ["_build", "toy_distill_results.rst"]
html_theme = "alabaster"
html_title = f"diode {release}"
