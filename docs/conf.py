"""Sphinx configuration of the documentation site (built by `python docs/build.py`, which see).

The sources are the notebooks as nbdev processes them for docs (`_proc/`), converted by build.py into
`docs/_build/src/`; this file is the configuration directory (`sphinx-build -c docs`). Everything the pages
load is served from the site itself: no font, script or style comes from the network.
"""
import sys
from configparser import ConfigParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / '_ext'))

_cfg = ConfigParser(delimiters=['='])
_cfg.read(Path(__file__).resolve().parent.parent / 'settings.ini', encoding='utf-8')
_cfg = _cfg['DEFAULT']

project = _cfg['title']
author = _cfg['author']
copyright = _cfg['copyright']
release = version = _cfg['version']

extensions = [
    'myst_nb',                 # notebooks (and MyST markdown) as pages, outputs as stored
    'sphinx-mathjax-offline',  # MathJax 3 copied into _static/mathjax instead of loaded from a CDN
]

# Notebooks are rendered with the outputs they were committed with; nothing is executed here.
nb_execution_mode = 'off'
nb_render_markdown_format = 'myst'   # show_doc's markdown output: math, tables, headings
nb_merge_streams = True
nb_ipywidgets_js = {}                # never load the widget runtime (from a CDN); widgets show their text
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_block']
myst_dmath_double_inline = True
myst_heading_anchors = 4             # heading anchors, so that `page.ipynb#name` links resolve,
myst_heading_slug_func = 'nbdev_anchors.slugify'  # named as nbdev's doc links expect (`#cls.method`)
suppress_warnings = ['myst.header']  # show_doc's `###` headings sit under a notebook's `##` or `#`

html_theme = 'furo'
html_title = project
html_static_path = ['_static']
html_css_files = ['site.css']
html_favicon = '_static/favicon.svg'
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {'top_of_page_buttons': []}
pygments_style = 'friendly'
pygments_dark_style = 'monokai'
