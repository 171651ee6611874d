"""Data suites: a training mix, its held-out validation split (the primary evaluation set) and
evaluation sets from other domains that are never trained on.

`SUITES` holds the named suites; `suite(name)` looks one up. Sources are given as corpus names (see
`corpora.CORPORA`) or as source objects (`sources.LocalFiles`, `sources.HFDataset`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peer_sweeps.data.corpora import corpus
from peer_sweeps.data.errors import DataError
from peer_sweeps.data.sources import HFDataset, LocalFiles, Source

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
PRIMARY = "validation"


@dataclass(frozen=True)
class Suite:
    """`train`: the sources of the training mix. The validation split is `validation_fraction` of each
    training source's documents, held out by document, unless `validation` names sources of its own
    (C4's validation split, say). `eval_sets`: name -> sources, in report order. Evaluation documents
    that share a word `ngram` with the training mix are dropped. `auto_prepare`: everything the suite needs
    comes from the package registries or this repository, so `peer-sweeps run` prepares it when it is
    missing; a suite that needs a dataset hub or a user's files is left to `peer-sweeps data prepare`."""

    name: str
    description: str
    train: tuple[str | Source, ...]
    eval_sets: dict[str, tuple[str | Source, ...]] = field(default_factory=dict)
    validation: tuple[str | Source, ...] = ()
    validation_fraction: float = 0.05
    ngram: int = 13
    auto_prepare: bool = False

    def sources(self, group: tuple[str | Source, ...]) -> list[Source]:
        """The source objects of a group; corpus names are looked up (unknown ones raise DataError)."""
        return [corpus(s) if isinstance(s, str) else s for s in group]


DEFAULT = Suite(
    name="default",
    description="pip-only: news, plays, scripture and software docs for training; "
                "Wikipedia, Milton and Australian news for evaluation",
    train=("bbc_news", "shakespeare_plays", "kjv", "django_docs"),
    eval_sets={"wikipedia": ("enwiki_sample",), "milton": ("milton",), "news_au": ("lee_news",)},
    auto_prepare=True,
)

FIXTURE = Suite(
    name="fixture",
    description="about 13 KB of public-domain text from the registry archives (KJV chapters and Shakespeare "
                "scenes for training; Milton's verse and prose for evaluation), shipped under tests/fixtures",
    train=(LocalFiles("fixture_train", (str(FIXTURES / "train.jsonl"),)),),
    eval_sets={
        "verse": (LocalFiles("fixture_verse", (str(FIXTURES / "verse.txt"),), separator="\n\n\n"),),
        "prose": (LocalFiles("fixture_prose", (str(FIXTURES / "prose.jsonl"),)),),
    },
    validation_fraction=0.2,
    auto_prepare=True,
)

C4 = Suite(
    name="c4",
    description="needs hub access and `datasets`: the paper's C4 (first 2M training documents, first 20k "
                "of C4's validation split) with WikiText-103 and LAMBADA for evaluation",
    train=(HFDataset("c4_train", "allenai/c4", "en", split="train", max_documents=2_000_000, streaming=True),),
    validation=(HFDataset("c4_validation", "allenai/c4", "en", split="validation", max_documents=20_000,
                          streaming=True),),
    eval_sets={
        "wikitext103": (HFDataset("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", split="test",
                                  passages=True),),
        "lambada": (HFDataset("lambada", "EleutherAI/lambada_openai", "en", split="test"),),
    },
)

SUITES: dict[str, Suite] = {s.name: s for s in (DEFAULT, FIXTURE, C4)}


def suite(name: str) -> Suite:
    if name not in SUITES:
        raise DataError(f"unknown data suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]
