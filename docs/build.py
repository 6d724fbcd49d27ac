"""Build the documentation site from the notebooks, offline and without Quarto.

    python docs/build.py            # -> docs/_build/html/index.html
    python docs/build.py --force    # re-process every notebook and rebuild every page

1. nbdev's own docs processor (the one `proc_nbs` runs) writes `docs/_build/proc/`: `#| hide` cells dropped,
   `show_doc` re-run with its markdown stored; unlike nbdev's default, `#| export` cells are kept as code (folded
   where the cell says `#| fold`), and a cell that mixes imports with other code is not re-run (only its imports),
   so outputs stay as committed.
   (Not `nbdev_docs`, `nbdev_preview` or `nbdev_proc_nbs`: without Quarto they try to install it, with
   sudo and pip.)
2. What Quarto would have read there is rewritten for MyST into `docs/_build/src/`: the front matter
   becomes the page's title and summary, `#| echo: false` the `remove-input` tag, other `#|` lines go,
   Quarto link attributes and show_doc's leading `---` go, links to the nbdev site become links between
   pages, show_doc's "[source]" links to the repository host go (the code is on the page, right after its
   documentation), show_doc's signatures are broken to fit the column, the blank lines between import groups of
   an import-only cell go (in a short cell they read as gaps between every line); the home page gets the table of
   contents, every other notebook in file order.
3. Sphinx (myst-nb, furo, MathJax served from the site) renders `docs/_build/html/`, warnings as errors.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
BUILD = DOCS / '_build'
PROC, SRC, HTML = BUILD / 'proc', BUILD / 'src', BUILD / 'html'


def settings():
    cfg = ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


def notebook_names():
    "The pages, in order: index first, then every notebook of nbs/ by file name (nbdev skips `_`/`.` names)."
    names = sorted(p.stem for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return sorted(names, key=lambda n: n != 'index')


def _patch_nbdev():
    """Two departures from nbdev's docs processing (nbdev 2.4.14 is pinned, so these names are stable).

    nbdev drops `#| export` cells from the docs (only their `show_doc` stays); here the code is the lesson,
    so they stay as code, after the `show_doc` of what they define (as nbdev does for `#| exports`).

    nbdev re-runs every cell that contains an import, to have the names `show_doc` needs, and stores the
    fresh outputs; a cell that mixes imports with other work (a benchmark, a plot) would run again in the
    docs build and replace its committed output. Here only such a cell's top-level imports run."""
    import ast
    import nbdev.processors as P
    P._hide_dirs = {'hide', 'default_exp'}   # read by nbdev's rm_export

    class mv_exports(P.Processor):
        """Move each exported cell after the `show_doc` cells nbdev added for it. A cell marked `#| fold` (this
        build's own directive, which nbdev drops from the exported code) is shown folded: myst-nb's `hide-input`.
        Exported cells are tagged `EXPORTED`, so that the page shows their code without what running them printed."""
        def begin(self):
            cells = self.nb.cells
            for cell in cells:
                directives = getattr(cell, 'directives_', {})
                tags = cell.setdefault('metadata', {}).setdefault('tags', [])
                if 'fold' in directives:
                    tags.append('hide-input')
                if {'export', 'exports'} & set(directives):
                    tags.append(EXPORTED)
            for cell in reversed([c for c in cells if c.cell_type == 'code' and {'export', 'exports'} & set(c.directives_)]):
                i = j = cell.idx_
                while j + 1 < len(cells) and getattr(cells[j + 1], 'has_sd', False):
                    j += 1
                cells[i:j + 1] = cells[i + 1:j + 1] + [cell]

    def imports_of_mixed(cell):
        "The top-level imports of a cell that nbdev would run only for its imports; None for any other cell."
        if cell.cell_type != 'code' or {'export', 'exports', 'exporti', 'exec_doc'} & set(cell.directives_):
            return None
        trees = cell.parsed_()
        if not trees or P._show_docs(trees) or not P._ast_contains(trees, (ast.Import, ast.ImportFrom)) \
                or not P._ast_contains(trees, (ast.Expr, ast.Assign)):
            return None
        return '\n'.join(ast.unparse(n) for n in trees if isinstance(n, (ast.Import, ast.ImportFrom)))  # top-level statements

    class exec_show_docs(P.exec_show_docs):
        def __call__(self, cell):
            imports = imports_of_mixed(cell)
            if imports is None:
                return super().__call__(cell)
            if imports and getattr(self.nb, 'has_docs_', False) and hasattr(self, 'k'):
                self.k.run_cell(imports)   # the cell's outputs stay as committed

    # FilterDefaults.base_procs looks these up by name when it builds its list
    P.mv_exports, P.exec_show_docs = mv_exports, exec_show_docs


def _digest(*paths, extra=''):
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def process_notebooks(names, force=False):
    """nbdev's docs pre-processing of each notebook (what `nbdev.serve.proc_nbs` runs for each file:
    `serve_drv.main` with nbdev's `FilterDefaults`), in this process, into `docs/_build/proc/`: `#| hide`
    cells dropped, `show_doc` executed, the front matter written. A notebook is processed again only when
    it, the package, settings.ini, nbdev or this file changed (content hashes, not modification times).
    Its own folder rather than nbdev's `_proc/`, which `nbdev_docs` (Quarto) fills with other choices."""
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    sys.path.insert(0, str(ROOT))
    import nbdev
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    _patch_nbdev()
    PROC.mkdir(parents=True, exist_ok=True)
    stamp_file = PROC / 'digests.json'
    stamps = {} if force or not stamp_file.exists() else json.loads(stamp_file.read_text())
    shared = _digest(ROOT / 'settings.ini', Path(__file__), *sorted((ROOT / 'myfla_gla').rglob('*.py')),
                     extra=nbdev.__version__)
    for n in names:
        src, dst = ROOT / 'nbs' / f'{n}.ipynb', PROC / f'{n}.ipynb'
        key = _digest(src, extra=shared)
        if stamps.get(n) != key or not dst.exists():
            try:
                nbdev.serve_drv.main((src, dst, FilterDefaults))
            except Exception:
                print(f'docs: nbdev could not process nbs/{n}.ipynb (its show_doc cells run, with its `#| export` cells '
                      'and imports)', file=sys.stderr)
                raise
            stamps[n] = key
            stamp_file.write_text(json.dumps(stamps, indent=1))
    return PROC


FRONT = re.compile(r'^\s*---\n(.*?)\n---\s*$', re.S)
QUARTO_ATTRS = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')   # [text](url){target="_blank" ...}
WIDGET = 'application/vnd.jupyter.widget-view+json'
EXPORTED = 'nbdev-exported'   # the tag this build gives `#| export` cells while nbdev processes them
TAGS = {'echo: false': 'remove-input', 'output: false': 'remove-output', 'include: false': 'remove-cell'}
SOURCE_LINK = re.compile(r'\[source\]\(https?://[^)\s]*/blob/[^)\s]*\)\s*')   # show_doc's link to the repository host
CODE_BLOCK = re.compile(r'(```python\n)(.*?)(\n```)', re.S)
CODE_LINK = re.compile(r'\[(`[^`\]]+`)\]\([^)\s]*\)')   # a markdown link, shown as text inside a code block
CODE_WIDTH = 86   # characters of code that fit furo's content column (736 px) at a desktop width


def _split_top_level(code):
    "`code` split after each comma outside brackets and strings (the separate parameters of a signature line)."
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(code):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '([{':
            depth += 1
        elif ch in ')]}':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(code[start:i + 1].strip())
            start = i + 1
    return parts + ([code[start:].strip()] if code[start:].strip() else [])


def fit_signature(code, width=CODE_WIDTH):
    """show_doc's signature, with every line that would scroll sideways in the column broken: a parameter's
    comment goes on its own line(s) above it, and parameters that share a line get a line each. (Links nbdev puts in
    its comments are markdown, which a code block shows as text: they become the name alone.)"""
    import textwrap
    out = []
    for line in CODE_LINK.sub(r'\1', code).splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        indent = line[:len(line) - len(line.lstrip())]
        code_part, _, comment = line.partition(' # ')
        if comment:
            out += [indent + '# ' + c for c in textwrap.wrap(comment, width - len(indent) - 2)]
        if len(code_part) <= width:
            out.append(code_part)
            continue
        rows = ['']
        for part in _split_top_level(code_part.strip()):
            if rows[-1] and len(indent) + len(rows[-1]) + 1 + len(part) > width:
                rows.append('')
            rows[-1] = f'{rows[-1]} {part}' if rows[-1] else part
        for row in rows:   # one parameter still too long (a long default) breaks at its spaces, indented once more
            out += textwrap.wrap(row, width, initial_indent=indent, subsequent_indent=indent + '    ',
                                 break_long_words=False, break_on_hyphens=False)
    return '\n'.join(out)


def imports_only(code):
    "Whether a cell's code is nothing but import statements."
    import ast
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return bool(tree.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def front_matter(nb):
    "The YAML front matter nbdev puts in a raw first cell (title, description, output-file), or {}."
    import yaml
    for cell in nb['cells'][:1]:
        m = FRONT.match(''.join(cell['source'])) if cell['cell_type'] == 'raw' else None
        if m:
            return yaml.safe_load(m.group(1)) or {}
    return {}


def link_fixer(pages):
    "Links to the nbdev (Quarto) site, `DOC_URL/utils.html#name`, become links to our page `00_utils.ipynb#name`."
    cfg = settings()
    doc_url = re.compile(re.escape(cfg['doc_host'].rstrip('/') + '/' + cfg['doc_baseurl'].strip('/') + '/')
                         + r'([\w.-]+\.html)(#[\w.-]*)?')
    def fix(text):
        text = QUARTO_ATTRS.sub(r'\1', text)
        return doc_url.sub(lambda m: (pages[m[1]] + '.ipynb' + (m[2] or '')) if m[1] in pages else m[0], text)
    return fix


def convert_cell(cell, fix):
    "One processed cell as MyST reads it, or None to drop it."
    src = ''.join(cell['source'])
    if cell['cell_type'] == 'markdown':
        if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'):
            return None
        return {**cell, 'source': fix(src)}
    if cell['cell_type'] != 'code':
        return cell
    lines = src.splitlines()
    directives = [l[2:].strip() for l in lines if l.startswith('#|')]
    tags = sorted({t for d, t in TAGS.items() if d in directives} | set(cell.get('metadata', {}).get('tags', [])))
    exported, tags = EXPORTED in tags, [t for t in tags if t != EXPORTED]
    code = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
    if imports_only(code):
        code = '\n'.join(l for l in code.splitlines() if l.strip())
    outputs = []
    # an exported cell shows its code only: what its imports print while the docs build runs them is not the lesson
    # (a library's import-time warnings on this machine, say)
    for out in ([] if exported else cell.get('outputs', [])):
        if WIDGET in out.get('data', {}):  # a widget (a tqdm bar, say) without its runtime: keep its text
            out = {**out, 'data': {k: v for k, v in out['data'].items() if k != WIDGET}}
            if not out['data']:
                continue
        md = out.get('data', {}).get('text/markdown')
        if md is not None:
            md = ''.join(md)
            md = fix(re.sub(r'^\s*---\s*\n', '', md))  # show_doc's leading rule would read as front matter
            md = SOURCE_LINK.sub('', md)
            md = CODE_BLOCK.sub(lambda m: m[1] + fit_signature(m[2]) + m[3], md)
            out = {**out, 'data': {**out['data'], 'text/markdown': md}}
        outputs.append(out)
    if not code.strip() and not outputs:
        return None
    if not code.strip():
        tags = sorted(set(tags) | {'remove-input'})
    return {**cell, 'source': code, 'outputs': outputs, 'metadata': {**cell.get('metadata', {}), 'tags': tags}}


def convert(proc, names):
    "The processed notebooks `proc/<name>.ipynb` as MyST reads them: {name: notebook}."
    nbs = {n: json.loads((proc / f'{n}.ipynb').read_text(encoding='utf-8')) for n in names}
    fronts = {n: front_matter(nb) for n, nb in nbs.items()}
    pages = {f.get('output-file', n + '.html'): n for n, f in fronts.items()}
    fix = link_fixer(pages)
    out = {}
    for n, nb in nbs.items():
        f = fronts[n]
        head = f"# {f.get('title', n)}\n" + (f"\n{{.lead}}\n{f['description']}\n" if f.get('description') else '')
        cells = [{'cell_type': 'markdown', 'metadata': {}, 'source': head}] if f else []
        cells += [c for c in (convert_cell(c, fix) for c in (nb['cells'][1:] if f else nb['cells'])) if c]
        if n == 'index':
            toc = '\n'.join(m for m in names if m != 'index')
            cells.append({'cell_type': 'markdown', 'metadata': {},
                          'source': f'```{{toctree}}\n:hidden:\n:maxdepth: 1\n\n{toc}\n```'})
        meta = {k: v for k, v in nb.get('metadata', {}).items() if k != 'widgets'}
        meta.setdefault('kernelspec', {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'})
        meta.setdefault('language_info', {'name': 'python', 'pygments_lexer': 'ipython3'})
        for c in cells:
            c.pop('id', None)
        out[n] = {'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 4}
    return unlink_missing_anchors(out)


def _markdown_texts(nb):
    "Every markdown text of a converted notebook: markdown cells and markdown outputs (show_doc's headings)."
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            yield c['source']
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}):
                yield ''.join(o['data']['text/markdown'])


def unlink_missing_anchors(nbs):
    """nbdev links every backticked name it indexes, private helpers and undocumented methods included; only those
    with a heading on their page (a show_doc entry or a section) have an anchor. The others stay plain code."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _ext.nbdev_anchors import slugify
    anchors = {n: {slugify(h) for text in _markdown_texts(nb) for h in HEADING.findall(text)} for n, nb in nbs.items()}
    def unlink(text):
        return LOCAL_LINK.sub(lambda m: m[0] if m[3] in anchors.get(m[2], ()) else m[1], text)
    for nb in nbs.values():
        for c in nb['cells']:
            if c['cell_type'] == 'markdown':
                c['source'] = unlink(c['source'])
            for o in c.get('outputs', []):
                if 'text/markdown' in o.get('data', {}):
                    o['data']['text/markdown'] = unlink(''.join(o['data']['text/markdown']))
    return nbs


HEADING = re.compile(r'^#{1,6}\s+(.+?)\s*$', re.M)
LOCAL_LINK = re.compile(r'\[([^\]]*)\]\(([\w.-]+)\.ipynb#([\w.-]+)\)')


def stage(nbs):
    """Write the converted notebooks to SRC, touching only changed files so that Sphinx rebuilds only those.
    Returns whether the navigation (the pages, their order or titles) or the site's look (conf.py, _static/)
    changed: then every page is rebuilt, since Sphinx would leave unchanged pages as they were."""
    SRC.mkdir(parents=True, exist_ok=True)
    nav = json.dumps([(n, ''.join(nb['cells'][0]['source']).strip().split('\n')[0] if nb['cells'] else '')
                      for n, nb in nbs.items()])
    nav += _digest(*sorted(p for p in DOCS.glob('_static/**/*') if p.is_file()), DOCS / 'conf.py')  # and the look
    nav_file = BUILD / 'navigation.txt'
    nav_changed = not nav_file.exists() or nav_file.read_text() != nav
    for p in SRC.glob('*.ipynb'):
        if p.stem not in nbs:  # a notebook that is gone: its page goes too
            p.unlink()
            (HTML / f'{p.stem}.html').unlink(missing_ok=True)
    for n, nb in nbs.items():
        p, text = SRC / f'{n}.ipynb', json.dumps(nb, indent=1, ensure_ascii=False) + '\n'
        if not p.exists() or p.read_text(encoding='utf-8') != text:
            p.write_text(text, encoding='utf-8')
    return nav, nav_changed


def sphinx(strict=True, quiet=True, fresh=False):
    from sphinx.cmd.build import build_main
    args = ['-b', 'html', '-c', str(DOCS), '-d', str(BUILD / 'doctrees'), str(SRC), str(HTML)]
    opts = (['-W', '--keep-going'] if strict else []) + (['-q'] if quiet else []) + (['-E'] if fresh else [])
    return build_main(opts + args)


def build(force=False, strict=True, quiet=True):
    "The whole build; returns the path of the home page (raises if Sphinx fails)."
    t0 = time.perf_counter()
    names = notebook_names()
    proc = process_notebooks(names, force)
    nav, nav_changed = stage(convert(proc, names))
    if sphinx(strict, quiet, fresh=force or nav_changed):
        raise SystemExit('sphinx-build failed (see the messages above)')
    (BUILD / 'navigation.txt').write_text(nav)  # only once the pages carry it
    index = HTML / 'index.html'
    print(f'docs: {len(names)} pages in {time.perf_counter() - t0:.1f} s -> {index.relative_to(ROOT)}')
    return index


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--force', action='store_true', help='re-process every notebook')
    ap.add_argument('--allow-warnings', action='store_true', help="don't treat Sphinx warnings as errors")
    ap.add_argument('-v', '--verbose', action='store_true', help="show Sphinx's progress")
    a = ap.parse_args()
    build(a.force, strict=not a.allow_warnings, quiet=not a.verbose)
