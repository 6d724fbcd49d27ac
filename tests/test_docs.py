"""The documentation site, as a reader's browser shows it.

Builds the site (`python docs/build.py`, incremental: seconds), serves `docs/_build/html` on 127.0.0.1 and
loads every page in headless Chromium (Debian's `chromium`, driven by Playwright; never Playwright's own
browser download). Each page must: carry its notebook's title, show the API names its module exports,
typeset all its math, load every image, log no console or page error, have no failed request and no
request leaving 127.0.0.1, no broken internal link (the `#fragment` included), no link to the repository
host named in settings.ini (`git_url`, an address the site does not vouch for), no nbdev `#|` directive
left in the text, show its `#| export` cells as code and none of its `#| hide` cells, and link to the
previous and next chapter in notebook order. Its layout at a desktop width (1280 px, furo's content column
736 px): no figure (img, svg) wider than the column or cut off by its box, no code block (pre), table or output
that scrolls sideways, every image at least as wide as it was drawn, no lead-in sentence (a paragraph ending with
':') without what it introduces after it (as when its cell is hidden), no number in a table split across two
lines, no command-line flag rendered with a dash (`--naive-bwd` as "–naive-bwd"), and no blank lines inside a
cell of imports only. The layout check is itself tested: each defect, put into a correct page, must be reported
(`test_layout_check_catches`). Chromium runs headless on a fresh profile with the flags below. With `MYFLA_DOCS_SCREENSHOTS=1` a screenshot of every page is saved under `docs/_build/screenshots/` and the home page's path
is printed (about a third of a second a page, so not by default).

Without Chromium (or Playwright) the test skips, except in CI (`CI=true`), where that is a failure.
"""
import ast
import functools
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

root = Path(__file__).resolve().parent.parent
html_dir = root / 'docs' / '_build' / 'html'
shots = root / 'docs' / '_build' / 'screenshots' if os.environ.get('MYFLA_DOCS_SCREENSHOTS') == '1' else None
chromium = os.environ.get('CHROMIUM', '/usr/bin/chromium')
in_ci = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')
chromium_flags = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']

_spec = importlib.util.spec_from_file_location('myfla_gla_docs_build', root / 'docs' / 'build.py')
docs_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_build)
pages = docs_build.notebook_names()   # the build's own list of pages, in order
doc_host = docs_build.settings()['doc_host']
git_url = docs_build.settings()['git_url']


def require(ok, why):
    "Skip when a browser prerequisite is missing here; in CI the browser test must run, so fail."
    if ok:
        return
    if in_ci:
        pytest.fail(f'{why}; CI=true, so the browser test may not be skipped (.ci/run installs chromium)')
    pytest.skip(why)


def title_of(name):
    "A notebook's title: its first cell is `# Title`."
    nb = json.loads((root / 'nbs' / f'{name}.ipynb').read_text(encoding='utf-8'))
    return ''.join(nb['cells'][0]['source']).splitlines()[0].lstrip('#').strip()


def api_names(name):
    """The public names the notebook's exported cells define (in whichever module they go to, its `__all__`), in
    order; [] if none. nbdev marks each exported cell in the module with `# %% ../nbs/<notebook>.ipynb`."""
    names = []
    for py in sorted((root / 'myfla_gla').rglob('*.py')):
        text = py.read_text(encoding='utf-8')
        tree = ast.parse(text)
        public = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                       and any(getattr(t, 'id', None) == '__all__' for t in n.targets)), [])
        marks = [(m.start(), m[1]) for m in re.finditer(r'^# %% (?:\.\./)+nbs/([\w.-]+)\.ipynb', text, re.M)]
        starts = [text.count('\n', 0, pos) + 1 for pos, _ in marks]   # line of each mark
        for node in tree.body:
            defined = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, 'targets', []) if isinstance(t, ast.Name)]
            owner = [nb for line, (_, nb) in zip(starts, marks) if line <= node.lineno]
            if owner and owner[-1] == name:
                names += [n for n in defined if n in public and n not in names]
    return names


def cells_with(name, directive):
    "The code (directive lines dropped) of the notebook's cells that carry `#| directive`."
    nb = json.loads((root / 'nbs' / f'{name}.ipynb').read_text(encoding='utf-8'))
    found = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'code' and re.search(rf'^#\|\s*{directive}\s*$', src, re.M):
            found.append('\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip())
    return [c for c in found if c]


def squash(text):
    return ' '.join(text.split())


@pytest.fixture(scope='module')
def site():
    require(Path(chromium).exists(), f'no Chromium at {chromium} (apt-get install chromium)')
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require(False, 'Playwright for Python is not installed (it is in the dev requirements)')
    run = subprocess.run([sys.executable, str(root / 'docs' / 'build.py')], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, f'docs build failed:\n{run.stdout[-5000:]}\n{run.stderr[-5000:]}'
    return html_dir


@pytest.fixture(scope='module')
def base_url(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}/'
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def browser(base_url, tmp_path_factory):
    "A fresh Chromium profile; any request for a host other than 127.0.0.1 is recorded and aborted."
    from playwright.sync_api import sync_playwright
    outside = []
    def guard(route):
        if urlsplit(route.request.url).hostname == '127.0.0.1':
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp('chromium-profile')), executable_path=chromium, headless=True,
            args=chromium_flags, viewport={'width': 1280, 'height': 860}, service_workers='block')
        ctx.set_default_timeout(20_000)
        ctx.route('**/*', guard)
        ctx.outside = outside
        yield ctx
        ctx.close()


# Visible text outside code, with `$...$` or `\(...\)` left untypeset by MathJax.
UNTYPESET = """() => {
  const skip = 'PRE, CODE, SCRIPT, STYLE, TEXTAREA, MJX-CONTAINER, NOSCRIPT';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const bad = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest(skip)) continue;
    const m = n.textContent.match(/\\$[^$\\s][^$]*\\$|\\\\\\(|\\\\\\[/);
    if (m) bad.push(n.textContent.trim().slice(0, 120));
  }
  return bad;
}"""

BROKEN_IMAGES = """async () => {
  const bad = [];
  for (const img of document.images) {
    img.loading = 'eager';
    try { await img.decode(); } catch (e) {}
    if (!img.complete || img.naturalWidth === 0) bad.push(img.src);
  }
  return bad;
}"""

# The layout defects a reader sees at a desktop width; each entry is a problem.
LAYOUT = """() => {
  const bad = [];
  const article = document.querySelector('article');
  const column = article.getBoundingClientRect();
  const clip = el => {   // the nearest ancestor inside the article that cuts `el` off (scrolls or hides overflow)
    for (let a = el.parentElement; a && a !== article; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== 'visible' && a.scrollWidth > a.clientWidth + 1) return a;
    return null;
  };
  for (const fig of article.querySelectorAll('img, svg')) {   // a figure wider than the column, or cut off
    if (fig.closest('mjx-container') || fig.parentElement.closest('svg')) continue;   // math, or part of a figure
    const r = fig.getBoundingClientRect(), name = (fig.getAttribute('src') || 'svg').split('/').pop().slice(0, 40);
    if (r.width > column.width + 1 || r.right > column.right + 1 || r.left < column.left - 1)
      bad.push(`figure ${Math.round(r.width)} px wide, the column ${Math.round(column.width)} px: ${name}`);
    else if (clip(fig))
      bad.push(`figure cut off by its box: ${name}`);
  }
  const first = el => (el.textContent.trim().split('\\n')[0] || '').slice(0, 60);
  for (const el of article.querySelectorAll('pre, table, .table-wrapper, .cell_output')) {   // sideways scrolling
    if (el.matches('.cell_output') && el.querySelector('pre, table, img, svg'))
      continue;   // its code, table or figure is checked itself
    const kind = el.tagName === 'PRE' ? 'code' : el.matches('table, .table-wrapper') ? 'table' : 'output';
    if (el.scrollWidth > el.clientWidth + 1)
      bad.push(`${kind} scrolls sideways (${el.scrollWidth} > ${el.clientWidth} px): ${first(el)}`);
  }
  // A lead-in sentence (a paragraph ending with ':') must be followed by what it introduces (code, an output, a list,
  // a table, a figure, displayed math, a folded cell), not by the next heading or paragraph (as when the cell it led
  // to is hidden).
  const blocks = [...article.querySelectorAll('p, h1, h2, h3, h4, h5, h6, pre, table, img, svg, ul, ol, dl, '
                                              + 'blockquote, mjx-container, .cell_output, .admonition, summary')]
    .filter(b => !b.closest('td, th') && !b.parentElement.closest('summary') && b.getBoundingClientRect().height > 0
                 && (b.textContent.trim() || b.matches('img, svg') || b.querySelector('img, svg')));
  blocks.forEach((b, i) => {
    if (b.tagName !== 'P' || !b.textContent.trim().endsWith(':')) return;
    const next = blocks.slice(i + 1).find(n => !b.contains(n));
    if (!next || /^H\\d$/.test(next.tagName) || next.tagName === 'P')
      bad.push(`a lead-in sentence with nothing after it: ...${b.textContent.trim().slice(-60)}`);
  });
  const number = /(?<![\\w.+-])[-+]?\\d+(?:\\.\\d+)?(?:e[-+]?\\d+)?[x×!%]?(?![\\w.+-])/g;
  for (const cell of article.querySelectorAll('td, th')) {   // a number split across two lines
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      for (const m of n.textContent.matchAll(number)) {
        const r = document.createRange();
        r.setStart(n, m.index);
        r.setEnd(n, m.index + m[0].length);
        const lines = new Set([...r.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top)));
        if (lines.size > 1) bad.push(`number split across lines in a table: ${m[0]}`);
      }
    }
  }
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);   // `--flag` typeset as a dash
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const m = n.textContent.match(/(?:^|[\\s(\\[])[\\u2013\\u2014][a-z][\\w-]*/);
    if (m) bad.push(`a flag rendered with a dash: ${m[0].trim()}`);
  }
  for (const img of article.querySelectorAll('img')) {   // squeezed below the size it was drawn at (so its text too)
    const w = img.getBoundingClientRect().width;
    if (img.naturalWidth && w < img.naturalWidth - 1)
      bad.push(`image shown ${Math.round(w)} px wide, drawn ${img.naturalWidth}: ${img.src.split('/').pop()}`);
  }
  for (const pre of article.querySelectorAll('.cell_input pre')) {   // blank lines in a cell of imports
    const lines = pre.textContent.replace(/\\n+$/, '').split('\\n');
    if (lines.some(l => /^(import|from) /.test(l)) && lines.every(l => !l.trim() || /^(import |from |    |\\))/.test(l))
        && lines.some(l => !l.trim()))
      bad.push(`blank lines in a cell of imports: ${lines[0]}`);
  }
  return bad;
}"""

MATHJAX_DONE = """() => (window.MathJax && MathJax.startup && MathJax.startup.promise)
  ? MathJax.startup.promise.then(() => document.querySelectorAll('mjx-container').length) : -1"""


@functools.lru_cache(maxsize=None)
def ids_in(path):
    return set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding='utf-8')))


def visit(browser, url):
    "Load a page; return it with the problems seen while loading."
    page = browser.new_page()
    problems = []
    page.on('console', lambda m: m.type == 'error' and problems.append(f'console error: {m.text}'))
    page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: problems.append(f'request failed: {r.url} ({r.failure})'))
    page.on('response', lambda r: r.status >= 400 and problems.append(f'HTTP {r.status}: {r.url}'))
    pending = set()   # requests not yet finished or failed (MathJax's fonts load while it typesets)
    page.on('request', lambda r: pending.add(r))
    for done in ('requestfinished', 'requestfailed'):
        page.on(done, lambda r: pending.discard(r))
    n_out = len(browser.outside)
    page.goto(url, wait_until='load')
    typeset = page.evaluate(MATHJAX_DONE)
    # every request answered: what 'networkidle' waits for, without its fixed half second of quiet per page
    for _ in range(500):
        if not pending:
            break
        page.wait_for_timeout(20)
    problems += [f'request unanswered after 10 s: {r.url}' for r in pending]
    problems += [f'request leaving 127.0.0.1: {u}' for u in browser.outside[n_out:]]
    return page, problems, typeset


def check_links(page, base_url):
    "Every link into the site reaches an existing file, and its #fragment an element of that page."
    broken = []
    for href in page.eval_on_selector_all('a[href]', 'els => els.map(a => a.href)'):
        if not href.startswith(base_url):
            continue
        path, _, frag = href[len(base_url):].partition('#')
        target = html_dir / (path.split('?')[0] or 'index.html')
        if target.is_dir():
            target = target / 'index.html'
        if not target.is_file():
            broken.append(href)
        elif frag and target.suffix == '.html' and frag not in ids_in(target):
            broken.append(href)
    return broken


def test_every_notebook_is_a_page(site):
    assert pages[0] == 'index' and len(pages) > 1
    missing = [n for n in pages if not (site / f'{n}.html').is_file()]
    assert not missing, f'notebooks without a page: {missing}'


def test_the_home_page_lists_every_chapter():
    "The home page's (and so the README's) chapter list links every notebook, in notebook order, once."
    cell = next(''.join(c['source']) for c in json.loads((root / 'nbs' / 'index.ipynb').read_text())['cells']
                if ''.join(c['source']).startswith('## Chapters'))
    assert re.findall(r'^\d+\. \[[^]]+\]\((\w+)\.ipynb\)', cell, re.M) == pages[1:]


@pytest.mark.parametrize('name', pages + ['genindex', 'search'])
def test_page(browser, base_url, name, capsys):
    page, problems, typeset = visit(browser, base_url + f'{name}.html')
    try:
        title = page.title()
        text = page.inner_text('article') if page.query_selector('article') else page.inner_text('body')
        if name in pages:
            want = title_of(name)
            assert title.startswith(want), f'page title {title!r}, expected the notebook title {want!r}'
            assert page.inner_text('article h1').strip().rstrip('#').strip() == want
            missing = [a for a in api_names(name) if a not in text]
            assert not missing, f'API names missing from the page: {missing}'
            # Navigation: the sidebar lists every chapter, and the next/previous links follow notebook order.
            nav = page.eval_on_selector_all('.sidebar-tree a.reference', 'els => els.map(a => a.getAttribute("href"))')
            in_nav = {h.split('#')[0].removesuffix('.html') or name for h in nav}  # '#': this page
            assert set(pages[1:]) <= in_nav, f'sidebar lacks {sorted(set(pages[1:]) - in_nav)}'
            i = pages.index(name)
            nxt = page.query_selector('a.next-page')
            if i + 1 < len(pages):
                assert nxt and nxt.get_attribute('href').split('#')[0] == pages[i + 1] + '.html', 'next-page link'
            if i > 0:
                prv = page.query_selector('a.prev-page')
                assert prv and prv.get_attribute('href').split('#')[0] == pages[i - 1] + '.html', 'prev-page link'
            # nbdev's directives: `#| export` cells show as code, `#| hide` cells don't show.
            code = squash(' '.join(page.eval_on_selector_all('article pre', 'els => els.map(e => e.textContent)')))
            unshown = [c.splitlines()[0] for c in cells_with(name, 'export') if squash(c) not in code]
            assert not unshown, f'exported cells not shown as code: {unshown}'
            shown = [c.splitlines()[0] for c in cells_with(name, 'hide') if squash(c) in code]
            assert not shown, f'hidden cells shown: {shown}'
            n_math = len(page.query_selector_all('article .math'))
            assert n_math == 0 or typeset > 0, f'{n_math} math elements but MathJax typeset none'
        assert title, 'empty <title>'
        problems += [f'untypeset math: {t!r}' for t in page.evaluate(UNTYPESET)]
        problems += [f'image not loaded: {u}' for u in page.evaluate(BROKEN_IMAGES)]
        problems += [f'nbdev directive on the page: {l!r}' for l in text.splitlines() if l.strip().startswith('#|')]
        problems += [f'broken internal link: {h}' for h in check_links(page, base_url)]
        hrefs = page.eval_on_selector_all('a[href]', 'els => els.map(a => a.href)')
        problems += [f'link to the nbdev site left in: {h}' for h in hrefs if h.startswith(doc_host)]
        problems += [f'link to the repository host of settings.ini: {h}' for h in hrefs if h.startswith(git_url)]
        if name in pages:
            problems += page.evaluate(LAYOUT)
        assert not problems, '\n'.join(problems)
        if shots and name in pages:
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=shots / f'{name}.png')
            if name == 'index':
                with capsys.disabled():  # shown even when pytest captures the output
                    print(f'\nscreenshot of the home page: {shots / "index.png"}')
    finally:
        page.close()


# Each layout defect, put into a real page, and the LAYOUT problem it must give (None: a correct layout, no problem).
DEFECTS = {
    'figure wider than the column': ("<svg width='900' height='20'></svg>", 'figure 900 px wide'),
    'figure cut off by its box': ("<div style='width: 300px; overflow: hidden'><img src='_static/favicon.svg' "
                                  "width='400' height='20' style='max-width: none'></div>", 'figure cut off by its box'),
    'code that scrolls': (f"<pre style='white-space: pre'>{'x' * 200}</pre>", 'code scrolls sideways'),
    'table that scrolls': ("<div class='table-wrapper' style='overflow-x: auto'><table><tr><td style='white-space: "
                           f"nowrap'>{'y ' * 200}</td></tr></table></div>", 'table scrolls sideways'),
    'lead-in before a heading': ('<p>The cases:</p><h2>Next</h2>', 'a lead-in sentence with nothing after it'),
    'lead-in before a paragraph': ('<p>The cases:</p><p>Something else.</p>', 'a lead-in sentence with nothing'),
    'lead-in at the end': ('<p>The cases:</p>', 'a lead-in sentence with nothing after it'),
    'lead-in before a list': ('<p>The cases:</p><ul><li>one</li></ul><h2>Next</h2>', None),
}


@pytest.mark.parametrize('defect', DEFECTS)
def test_layout_check_catches(browser, base_url, defect):
    "The layout check reports each defect put into an otherwise correct page (and nothing for a correct lead-in)."
    html, expected = DEFECTS[defect]
    page, _, _ = visit(browser, base_url + f'{pages[-1]}.html')   # loaded as every page is (`test_page` checks it)
    try:
        before = page.evaluate(LAYOUT)
        assert not before, f'the page has layout problems of its own: {before}'
        page.evaluate("html => [...document.querySelectorAll('article section')].pop()"
                      ".insertAdjacentHTML('beforeend', html)", html)
        found = page.evaluate(LAYOUT)
        if expected is None:
            assert not found, found
        else:
            assert any(p.startswith(expected) for p in found), f'{defect}: expected {expected!r}, got {found}'
    finally:
        page.close()
