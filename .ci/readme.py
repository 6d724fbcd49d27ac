"""Keep README.md in step with nbs/index.ipynb without Quarto (nbdev_readme needs it).

python .ci/readme.py            write README.md from nbs/index.ipynb
python .ci/readme.py --check    exit 1 if README.md is out of step
python .ci/readme.py --command setup|test   print the README's set-up or test command (used by .ci/run)
"""
import json
import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent


def render(nb_path=root / 'nbs' / 'index.ipynb'):
    "Markdown cells as they are, shown code cells as python blocks followed by their text output."
    parts = []
    for cell in json.loads(Path(nb_path).read_text())['cells']:  # plain json: runs before anything is installed
        src = ''.join(cell['source']).strip()
        if cell['cell_type'] == 'markdown':   # links between notebooks, seen from the repository's root
            parts.append(re.sub(r'\]\((\w+\.ipynb)', r'](nbs/\1', src))
        elif cell['cell_type'] == 'code' and not src.startswith('#| hide'):
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            if code:
                parts.append(f'```python\n{code}\n```')
            out = ''.join(''.join(o.get('text', '') or o.get('data', {}).get('text/plain', '')) for o in cell.get('outputs', []))
            if out.strip():
                parts.append(f'```\n{out.rstrip()}\n```')
    return '\n\n'.join(parts) + '\n'


def command(which):
    "The first `sh` block is the set-up command, the second the test command."
    blocks = render().split('```sh\n')[1:]
    return blocks[{'setup': 0, 'test': 1}[which]].split('\n```')[0].strip()


if __name__ == '__main__':
    args = sys.argv[1:]
    if args[:1] == ['--command']:
        print(command(args[1]))
    elif args[:1] == ['--check']:
        if (root / 'README.md').read_text() != render():
            sys.exit('README.md is out of step with nbs/index.ipynb: run `python .ci/readme.py`')
    else:
        (root / 'README.md').write_text(render())
