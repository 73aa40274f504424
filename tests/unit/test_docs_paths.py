"""Every repository path the documents name exists: a file moved without its mentions fails here.

The invariants page cites the tests that show each promise, and the other pages point into server/,
devkit/, scripts/ and deploy/; after the house was laid out anew these are the links most likely to rot.
"""

from __future__ import annotations

import re

from devkit import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "clients" / "python" / "README.md"]
# A path in backticks or a link, rooted in one of the project's folders, ending in a file name with an extension.
PATH = re.compile(r"(?<![\w/.-])((?:server|tests|devkit|scripts|deploy|bench|loadtest|clients|protos|docs|training)"
                  r"/[\w./-]*\.(?:py|md|yaml|yml|json|proto|sh|keras|toml))")


def test_every_path_the_documents_name_exists() -> None:
    missing = sorted({f"{document.relative_to(ROOT)}: {path}"
                      for document in DOCUMENTS for path in PATH.findall(document.read_text())
                      if not (ROOT / path).exists()})
    assert not missing, "\n".join(missing)
