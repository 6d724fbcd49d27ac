"""Heading anchors as nbdev names them, so that nbdev's links (`page.html#name`, `#cls.method`) resolve."""
import re


def slugify(title: str) -> str:
    "Pandoc's (Quarto's) rule, which nbdev's doc links follow: lower case, spaces to `-`, only `\\w`, `-`, `.` kept."
    return re.sub(r'\s+', '-', re.sub(r'[^\w\s.-]', '', title.strip().lower()))
