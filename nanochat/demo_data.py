"""The built-in demo corpus: a seeded, invented world of facts and arithmetic, written in the real data's shapes.

A tiny model trained on it for minutes on a CPU measurably learns something, so every stage of the pipeline
can run offline and be judged by numbers. The world holds invented countries and their capitals, objects and
their colors, animals (legs, habitat, sound) and two-digit sums. Every name is built from syllables by a
seeded RNG, so it is pronounceable, unique and no English word.

A share of the entities (`heldout_fraction`) is held out: their facts are stated in the pretraining text, but
they never appear in any *train* task split; the *test* splits ask only about them, plus two-digit sums that
appear nowhere else. A model that answers the test questions has carried facts from pretraining through
fine-tuning, not memorised the fine-tuning answers.

Outputs in the cache root (see docs/architecture.md): `base_data/shard_*.parquet` (one `text` column; the
last shard is validation), `tasks/*.jsonl` (SmolTalk, MMLU, ARC, GSM8K, HumanEval and identity shapes) and
the `DEMO` manifest, written last. Same config, same bytes. Each file is written under a temporary name and
renamed; `remove_leftovers_of_killed_runs` clears the temporaries a killed run left (`nanochat.leftovers`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.configargs import UsageError, require
from nanochat.leftovers import remove_leftovers, temp_name
from nanochat.paths import data_dir, shard_paths, tasks_dir
from nanochat.report import atomic_write_text

MANIFEST_NAME = "DEMO"
PARTIAL_NAME = "DEMO.partial"
MANIFEST_FORMAT = "nanochat-demo-corpus/1"
MIN_SIDE = 4  # each side of the held-out split needs four entities of every kind for 4-way choices

COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "white", "black", "brown", "pink", "gray",
          "silver")
HABITATS = ("desert", "forest", "ocean", "mountains", "swamp", "grassland", "jungle", "river")
LEG_COUNTS = (2, 4, 6, 8)
SOUNDS = {"hisses": "hissing", "roars": "roaring", "chirps": "chirping", "hums": "humming",
          "whistles": "whistling", "growls": "growling", "squeaks": "squeaking", "croaks": "croaking",
          "clicks": "clicking", "howls": "howling"}
PEOPLE = ("Mia", "Ben", "Lena", "Omar", "Sara", "Tom", "Nina", "Leo", "Ada", "Sam", "Ivy", "Max", "Zoe",
          "Eli", "Ruth", "Hugo")
SUM_RANGE = range(10, 100)

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
          "tr", "pl", "sh", "th")
SINGLE_ONSETS = tuple(o for o in ONSETS if len(o) == 1)
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s", "m")
NAME_SUFFIXES = {
    "country": ("ia", "ora", "esh", "and", "ovia", "eth"),
    "capital": ("ton", "burg", "mar", "dun", "vik", "heim"),
    "object": ("et", "ule", "ock", "ib", "ard"),
    "animal": ("og", "ith", "emb", "ux", "aw"),
}


@dataclass
class DemoCorpusConfig:
    """Settings of the demo world and how much of each file to write."""

    seed: int = field(default=0, metadata={"help": "seed of the world and of every file"})
    n_countries: int = field(default=100, metadata={"help": "invented countries, each with a capital"})
    n_objects: int = field(default=50, metadata={"help": "invented objects, each with a color"})
    n_animals: int = field(default=40, metadata={"help": "invented animals (legs, habitat, sound)"})
    pretrain_megabytes: float = field(default=3.0, metadata={"help": "pretraining text over all shards, MB"})
    num_shards: int = field(default=4, metadata={"help": "parquet shards; the last one is validation"})
    rows_per_row_group: int = field(default=256, metadata={"help": "documents per parquet row group"})
    heldout_fraction: float = field(default=0.3, metadata={
        "help": "share of entities (and two-digit sums) kept out of every train split"})
    n_smoltalk_train: int = field(default=3000, metadata={"help": "SmolTalk-shape train conversations"})
    n_smoltalk_test: int = field(default=300, metadata={"help": "SmolTalk-shape test conversations"})
    n_mmlu_train: int = field(default=1000, metadata={"help": "MMLU-shape auxiliary_train questions"})
    n_mmlu_test: int = field(default=300, metadata={"help": "MMLU-shape test questions"})
    n_arc_train: int = field(default=500, metadata={"help": "ARC-shape train questions, per difficulty"})
    n_arc_test: int = field(default=200, metadata={"help": "ARC-shape test questions, per difficulty"})
    n_gsm8k_train: int = field(default=500, metadata={"help": "GSM8K-shape train word problems"})
    n_gsm8k_test: int = field(default=200, metadata={"help": "GSM8K-shape test word problems"})
    n_identity: int = field(default=24, metadata={"help": "identity conversations"})

    def __post_init__(self) -> None:
        require(self.seed >= 0, "--seed must be zero or positive")
        require(0.0 < self.heldout_fraction < 1.0, "--heldout-fraction must be between 0 and 1 (e.g. 0.3)")
        for name in ("n_countries", "n_objects", "n_animals"):
            count = getattr(self, name)
            held = _heldout_count(count, self.heldout_fraction)
            require(held >= MIN_SIDE and count - held >= MIN_SIDE,
                    f"--{name.replace('_', '-')} {count} with --heldout-fraction {self.heldout_fraction} "
                    f"leaves {held} held out and {count - held} for training; each side needs {MIN_SIDE}: "
                    "raise the count")
        require(0.0 < self.pretrain_megabytes <= 10_000, "--pretrain-megabytes must be in (0, 10000]")
        require(self.num_shards >= 2, "--num-shards must be at least 2 (the last shard is validation)")
        require(self.rows_per_row_group >= 1, "--rows-per-row-group must be at least 1")
        for f in dataclasses.fields(DemoCorpusConfig):
            if f.name.startswith("n_") and f.name not in ("n_countries", "n_objects", "n_animals"):
                require(getattr(self, f.name) >= 1, f"--{f.name.replace('_', '-')} must be at least 1")


def _heldout_count(count: int, fraction: float) -> int:
    return int(round(count * fraction))


def corpus_config_dict(config: DemoCorpusConfig) -> dict[str, Any]:
    """The corpus settings alone (a stage config that extends DemoCorpusConfig drops its own flags)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(DemoCorpusConfig)}


# ----------------------------------------------------------------------------------------------- the world

@dataclass(frozen=True)
class Country:
    name: str
    capital: str


@dataclass(frozen=True)
class Thing:
    """An invented object and its color."""

    name: str
    color: str


@dataclass(frozen=True)
class Animal:
    name: str
    legs: int
    habitat: str
    sound: str  # third-person verb, a key of SOUNDS


@dataclass(frozen=True)
class Pool:
    """The entities and sums one kind of text may use: the train side, the held-out side, or everything."""

    countries: tuple[Country, ...]
    things: tuple[Thing, ...]
    animals: tuple[Animal, ...]
    sums: tuple[tuple[int, int], ...]  # unordered pairs (a <= b) this pool may state

    def sum_pair(self, rng: random.Random) -> tuple[int, int]:
        a, b = rng.choice(self.sums)
        return (a, b) if rng.random() < 0.5 else (b, a)


@dataclass(frozen=True)
class World:
    countries: tuple[Country, ...]
    things: tuple[Thing, ...]
    animals: tuple[Animal, ...]
    heldout_names: frozenset[str]  # names of held-out countries, objects and animals
    heldout_sums: frozenset[tuple[int, int]]  # unordered pairs (a <= b) of two-digit numbers

    def is_heldout(self, entity: Country | Thing | Animal) -> bool:
        return entity.name in self.heldout_names

    def sum_is_heldout(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self.heldout_sums

    def entity_names(self, heldout: bool) -> list[str]:
        """Every name on one side of the split (countries, capitals, objects, animals)."""
        names = [n for c in self.countries if self.is_heldout(c) == heldout for n in (c.name, c.capital)]
        names += [t.name for t in self.things if self.is_heldout(t) == heldout]
        names += [a.name for a in self.animals if self.is_heldout(a) == heldout]
        return names

    def pool(self, side: str) -> Pool:
        """'train': entities and sums train splits may use; 'test': held-out ones; 'all': pretraining."""
        if side not in ("train", "test", "all"):
            raise ValueError(f"unknown pool {side!r}; expected train, test or all")

        def keep(entity: Country | Thing | Animal) -> bool:
            return side == "all" or self.is_heldout(entity) == (side == "test")

        pairs = _all_sum_pairs()
        sums = [p for p in pairs if (p in self.heldout_sums) == (side == "test")]
        return Pool(tuple(filter(keep, self.countries)), tuple(filter(keep, self.things)),
                    tuple(filter(keep, self.animals)), tuple(sums))


def _all_sum_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in SUM_RANGE for b in SUM_RANGE if a <= b]


def _template_words() -> frozenset[str]:
    """Every English word the generator writes; an invented name must not be one of them."""
    texts: list[str] = [*COLORS, *HABITATS, *PEOPLE, *SOUNDS, *SOUNDS.values()]
    for table in (_FACT_STATEMENTS, _QUESTIONS, _ANSWERS, _CHITCHAT, _IDENTITY_QUESTIONS, _IDENTITY_ANSWERS,
                  _SYSTEM_PROMPTS):
        for value in table.values() if isinstance(table, dict) else table:
            texts.extend(value if isinstance(value, (tuple, list)) else [value])
    return frozenset(w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", str(text)))


def _invent_name(rng: random.Random, kind: str) -> str:
    parts: list[str] = []
    coda = ""
    for _ in range(2):
        onset = rng.choice(ONSETS if not coda else SINGLE_ONSETS)
        coda = rng.choice(CODAS)
        parts.append(onset + rng.choice(VOWELS) + coda)
    suffix = rng.choice(NAME_SUFFIXES[kind])
    if suffix[0] in VOWELS and not coda:
        parts.append(rng.choice(("r", "n", "l", "v")))
    if suffix[0] not in VOWELS and coda:
        parts.append(rng.choice(VOWELS))
    name = "".join(parts) + suffix
    return name.capitalize() if kind in ("country", "capital") else name


def _name_factory(rng: random.Random) -> Callable[[str], str]:
    """Draws names that are new, no prefix of another name (plurals stay unambiguous), no template word."""
    taken: list[str] = []
    reserved = _template_words()

    def draw(kind: str) -> str:
        while True:
            name = _invent_name(rng, kind)
            low = name.lower()
            if len(low) < 5 or low in reserved:
                continue
            if any(low.startswith(t) or t.startswith(low) for t in taken):
                continue
            taken.append(low)
            return name
    return draw


def build_world(config: DemoCorpusConfig) -> World:
    """The invented world for `config.seed`: entities, their facts, and which ones are held out."""
    rng = random.Random(f"demo-world:{config.seed}")
    draw = _name_factory(rng)
    countries = tuple(Country(draw("country"), draw("capital")) for _ in range(config.n_countries))
    things = tuple(Thing(draw("object"), rng.choice(COLORS)) for _ in range(config.n_objects))
    animals = tuple(Animal(draw("animal"), rng.choice(LEG_COUNTS), rng.choice(HABITATS), rng.choice(list(SOUNDS)))
                    for _ in range(config.n_animals))
    heldout: set[str] = set()
    for group in (countries, things, animals):
        names = [e.name for e in group]
        rng.shuffle(names)
        heldout.update(names[:_heldout_count(len(names), config.heldout_fraction)])
    pairs = _all_sum_pairs()
    rng.shuffle(pairs)
    heldout_sums = frozenset(pairs[:_heldout_count(len(pairs), config.heldout_fraction)])
    return World(countries, things, animals, frozenset(heldout), heldout_sums)


# ------------------------------------------------------------------------------------ facts and templates

def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slots(entity: Country | Thing | Animal) -> dict[str, Any]:
    """Template slots of one entity: {c} {cap} for countries, {o} {os} {col} for objects, {a} {as_} ... ."""
    if isinstance(entity, Country):
        return {"c": entity.name, "cap": entity.capital}
    if isinstance(entity, Thing):
        return {"o": entity.name, "os": _plural(entity.name), "Os": _cap(_plural(entity.name)),
                "col": entity.color}
    return {"a": entity.name, "as_": _plural(entity.name), "As": _cap(_plural(entity.name)),
            "legs": entity.legs, "habitat": entity.habitat, "sound": entity.sound,
            "gerund": SOUNDS[entity.sound]}


# Fact kinds: capital (country -> capital), capital_of (capital -> country), color, legs, habitat, sound, sum.
_ENTITY_KINDS = {"capital": "countries", "capital_of": "countries", "color": "things", "legs": "animals",
                 "habitat": "animals", "sound": "animals"}

_FACT_STATEMENTS = {
    "capital": ("The capital of {c} is {cap}.", "{cap} is the capital of {c}.", "{c} has its capital in {cap}.",
                "The capital city of {c} is {cap}.", "In {c}, the capital is {cap}.",
                "{cap}, the capital of {c}, is a busy city.", "The government of {c} meets in {cap}."),
    "color": ("The {o} is {col}.", "A {o} is always {col}.", "Every {o} is {col}.",
              "The color of the {o} is {col}.", "{Os} are {col}.", "If you see a {o}, it will be {col}."),
    "legs": ("The {a} has {legs} legs.", "A {a} walks on {legs} legs.", "Each {a} has {legs} legs.",
             "{As} have {legs} legs."),
    "habitat": ("The {a} lives in the {habitat}.", "You can find the {a} in the {habitat}.",
                "The home of the {a} is the {habitat}.", "{As} live in the {habitat}."),
    "sound": ("The {a} {sound}.", "A {a} {sound} when it is happy.", "The {a} makes a {gerund} sound.",
              "You can hear a {a} because it {sound}."),
    "sum": ("{x} plus {y} is {s}.", "{x} + {y} = {s}", "The sum of {x} and {y} is {s}.",
            "If you add {x} and {y}, you get {s}.", "{x} and {y} make {s}."),
}
_QUESTIONS = {
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?",
                "What city is the capital of {c}?", "Tell me the capital of {c}."),
    "capital_of": ("{cap} is the capital of which country?", "Which country has {cap} as its capital?",
                   "Of which country is {cap} the capital?"),
    "color": ("What color is the {o}?", "What color is a {o}?", "What is the color of the {o}?"),
    "legs": ("How many legs does the {a} have?", "How many legs does a {a} have?"),
    "habitat": ("Where does the {a} live?", "Where do {as_} live?", "What is the home of the {a}?"),
    "sound": ("What sound does the {a} make?", "What noise does a {a} make?"),
    "sum": ("What is {x} plus {y}?", "What is {x} + {y}?", "How much is {x} plus {y}?", "Add {x} and {y}."),
}
_ANSWERS = {
    "capital": "The capital of {c} is {cap}.",
    "capital_of": "{cap} is the capital of {c}.",
    "color": "The {o} is {col}.",
    "legs": "The {a} has {legs} legs.",
    "habitat": "The {a} lives in the {habitat}.",
    "sound": "The {a} {sound}.",
    "sum": "{x} plus {y} is {s}.",
}
_MC_SUBJECTS = {"capital": "world_geography", "capital_of": "world_geography", "color": "world_objects",
                "legs": "world_animals", "habitat": "world_animals", "sound": "world_animals",
                "sum": "elementary_mathematics"}
_CHITCHAT = (
    ("Hello!", "Hello! What would you like to know?"),
    ("Hi there.", "Hi! Ask me about countries, objects, animals or sums."),
    ("Thank you!", "You are welcome!"),
    ("Thanks, that helps.", "Glad I could help."),
    ("How are you today?", "I am fine, thank you. How can I help?"),
    ("Good morning!", "Good morning! What can I do for you?"),
    ("Can you help me with a question?", "Of course. What is your question?"),
    ("Goodbye!", "Goodbye! Have a nice day."),
)
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly assistant who answers briefly.",
                   "Answer the user's questions about the world.")
_IDENTITY_QUESTIONS = ("Who are you?", "What is your name?", "Who made you?", "Who trained you?",
                       "Are you ChatGPT?", "What are you?", "Tell me about yourself.", "What can you do?")
_IDENTITY_ANSWERS = {
    "Who are you?": "I am nanochat, a small language model. You trained me yourself with this project.",
    "What is your name?": "My name is nanochat.",
    "Who made you?": "You did: you trained me with the nanochat project, from raw text to chat.",
    "Who trained you?": "You trained me, with the nanochat project, on a small invented world.",
    "Are you ChatGPT?": "No, I am nanochat, a much smaller model that you trained with this project.",
    "What are you?": "I am nanochat, a small chat model trained with this project.",
    "Tell me about yourself.": "I am nanochat. You trained me with this project on a small invented world "
                               "of countries, objects, animals and sums, so that is what I know about.",
    "What can you do?": "I can answer questions about countries and their capitals, objects and their "
                        "colors, animals, and sums. I am small, so I know little else.",
}


@dataclass(frozen=True)
class Fact:
    kind: str
    entity: Country | Thing | Animal | None = None
    pair: tuple[int, int] | None = None

    def slots(self) -> dict[str, Any]:
        if self.pair is not None:
            x, y = self.pair
            return {"x": x, "y": y, "s": x + y}
        assert self.entity is not None
        return _slots(self.entity)

    def value(self) -> str:
        """The answer as it appears among multiple-choice options."""
        if self.pair is not None:
            return str(sum(self.pair))
        e = self.entity
        if isinstance(e, Country):
            return e.capital if self.kind == "capital" else e.name
        if isinstance(e, Thing):
            return e.color
        assert isinstance(e, Animal)
        return str(e.legs) if self.kind == "legs" else e.habitat if self.kind == "habitat" else e.sound


def _random_fact(rng: random.Random, pool: Pool, sum_share: float = 0.15) -> Fact:
    if rng.random() < sum_share:
        return Fact("sum", pair=pool.sum_pair(rng))
    kind = rng.choice(("capital", "capital", "capital_of", "color", "color", "legs", "habitat", "sound"))
    return Fact(kind, entity=rng.choice(getattr(pool, _ENTITY_KINDS[kind])))


def _question_answer(rng: random.Random, fact: Fact) -> tuple[str, str]:
    slots = fact.slots()
    return rng.choice(_QUESTIONS[fact.kind]).format(**slots), _ANSWERS[fact.kind].format(**slots)


def _statement(rng: random.Random, fact: Fact) -> str:
    kind = "capital" if fact.kind == "capital_of" else fact.kind
    return _cap(rng.choice(_FACT_STATEMENTS[kind]).format(**fact.slots()))


def _distractors(rng: random.Random, fact: Fact, pool: Pool) -> list[str]:
    """Three wrong options of the same type as the answer."""
    right = fact.value()
    if fact.kind == "sum":
        s = int(right)
        options = sorted({s + d for d in (-11, -10, -2, -1, 1, 2, 9, 10, 11) if s + d > 0})
    else:
        options = {"capital": [c.capital for c in pool.countries], "capital_of": [c.name for c in pool.countries],
                   "color": list(COLORS), "legs": [str(n) for n in LEG_COUNTS], "habitat": list(HABITATS),
                   "sound": list(SOUNDS)}[fact.kind]
    wrong = sorted({str(o) for o in options} - {right})
    return rng.sample(wrong, 3)


def _shuffled_choices(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


# --------------------------------------------------------------------------- multiple choice (MMLU, ARC)

@dataclass(frozen=True)
class Choice:
    question: str
    choices: list[str]
    answer: int
    subject: str


def _single_fact_choice(rng: random.Random, pool: Pool) -> Choice:
    fact = _random_fact(rng, pool)
    question = rng.choice(_QUESTIONS[fact.kind]).format(**fact.slots())
    choices, answer = _shuffled_choices(rng, fact.value(), _distractors(rng, fact, pool))
    return Choice(question, choices, answer, _MC_SUBJECTS[fact.kind])


def _which_entity_choice(rng: random.Random, pool: Pool) -> Choice | None:
    """'Which of these animals lives in the desert?': one fact, the options are entities."""
    kind = rng.choice(("color", "legs", "habitat", "sound"))
    if kind == "color":
        right = rng.choice(pool.things)
        wrong = [t.name for t in pool.things if t.color != right.color]
        question, subject = f"Which of these objects is {right.color}?", "world_objects"
    else:
        right = rng.choice(pool.animals)
        wrong = [a.name for a in pool.animals if getattr(a, kind) != getattr(right, kind)]
        question = {"legs": f"Which of these animals has {right.legs} legs?",
                    "habitat": f"Which of these animals lives in the {right.habitat}?",
                    "sound": f"Which of these animals {right.sound}?"}[kind]
        subject = "world_animals"
    if len(wrong) < 3:
        return None
    choices, answer = _shuffled_choices(rng, right.name, rng.sample(sorted(wrong), 3))
    return Choice(question, choices, answer, subject)


def _two_fact_animal_choice(rng: random.Random, pool: Pool) -> Choice | None:
    """'Which animal that lives in the desert has 6 legs?': needs two facts about each option."""
    first, second = rng.sample(("legs", "habitat", "sound"), 2)
    right = rng.choice(pool.animals)

    def matches(a: Animal) -> int:
        return (getattr(a, first) == getattr(right, first)) + (getattr(a, second) == getattr(right, second))

    others = [a for a in pool.animals if matches(a) < 2]
    if len(others) < 3:
        return None
    others.sort(key=lambda a: (-matches(a), a.name))  # prefer options that match one of the two facts
    near = [a for a in others if matches(a) == 1]
    wrong = rng.sample(near, 3) if len(near) >= 3 else near + rng.sample(others[len(near):], 3 - len(near))
    phrase = {"legs": f"has {right.legs} legs", "habitat": f"lives in the {right.habitat}",
              "sound": right.sound}
    question = f"Which animal that {phrase[first]} also {phrase[second]}?"
    choices, answer = _shuffled_choices(rng, right.name, [a.name for a in wrong])
    return Choice(question, choices, answer, "world_animals")


def _legs_total_choice(rng: random.Random, pool: Pool) -> Choice:
    animal = rng.choice(pool.animals)
    count = rng.randint(2, 5)
    right = str(count * animal.legs)
    options = {str(count * n) for n in LEG_COUNTS} | {str(animal.legs), str(count + animal.legs)}
    wrong = sorted(options - {right})
    question = f"How many legs do {count} {_plural(animal.name)} have in total?"
    choices, answer = _shuffled_choices(rng, right, rng.sample(wrong, 3))
    return Choice(question, choices, answer, "world_animals")


def _color_count_choice(rng: random.Random, pool: Pool) -> Choice:
    things = rng.sample(pool.things, 3)
    color = rng.choice([t.color for t in things] + [rng.choice(COLORS)])
    right = sum(t.color == color for t in things)
    person = rng.choice(PEOPLE)
    question = (f"{person} has a {things[0].name}, a {things[1].name} and a {things[2].name}. "
                f"How many of them are {color}?")
    return Choice(question, ["0", "1", "2", "3"], right, "world_objects")


def _arc_easy_choice(rng: random.Random, pool: Pool) -> Choice:
    if rng.random() < 0.4:
        found = _which_entity_choice(rng, pool)
        if found is not None:
            return found
    return _single_fact_choice(rng, pool)


def _arc_challenge_choice(rng: random.Random, pool: Pool) -> Choice:
    roll = rng.random()
    if roll < 0.5:
        found = _two_fact_animal_choice(rng, pool)
        if found is not None:
            return found
    return _legs_total_choice(rng, pool) if roll < 0.75 else _color_count_choice(rng, pool)


# --------------------------------------------------------------------------- word problems (GSM8K shape)

@dataclass(frozen=True)
class Step:
    text: str  # the sentence, with {calc} where the calculation goes
    expr: str  # e.g. "23+45"
    result: int


@dataclass(frozen=True)
class WordProblem:
    question: str
    steps: tuple[Step, ...]
    answer: int
    sum_pairs: tuple[tuple[int, int], ...]  # additions (and subtractions read as additions) it states

    def gsm8k_answer(self) -> str:
        lines = [s.text.format(calc=f"{_spaced(s.expr)} = <<{s.expr}={s.result}>>{s.result}") for s in self.steps]
        return "\n".join(lines + [f"#### {self.answer}"])

    def prose_solution(self) -> str:
        lines = [s.text.format(calc=f"{_spaced(s.expr)} = {s.result}") for s in self.steps]
        return "\n".join(lines + [f"The answer is {self.answer}."])


def _spaced(expr: str) -> str:
    return re.sub(r"([+\-*/])", r" \1 ", expr)


def _problem_gain_lose(rng: random.Random, pool: Pool) -> WordProblem:
    p, q = rng.sample(PEOPLE, 2)
    os_ = _plural(rng.choice(pool.things).name)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    s, r = a + b, a + b - c
    return WordProblem(
        f"{p} has {a} {os_}. {q} gives {p} {b} more {os_}. Then {p} gives {c} {os_} away. "
        f"How many {os_} does {p} have now?",
        (Step(f"After the gift, {p} has {{calc}} {os_}.", f"{a}+{b}", s),
         Step(f"After giving some away, {p} has {{calc}} {os_}.", f"{s}-{c}", r)),
        r, ((a, b), (r, c)))


def _problem_change(rng: random.Random, pool: Pool) -> WordProblem:
    p = rng.choice(PEOPLE)
    thing = rng.choice(pool.things)
    price, n = rng.randint(2, 9), rng.randint(2, 6)
    cost = price * n
    paid = (cost // 10 + 1 + rng.randint(0, 2)) * 10
    r = paid - cost
    return WordProblem(
        f"In a shop, one {thing.name} costs {price} coins. {p} buys {n} {_plural(thing.name)} and pays with "
        f"{paid} coins. How many coins does {p} get back?",
        (Step(f"The {_plural(thing.name)} cost {{calc}} coins.", f"{n}*{price}", cost),
         Step(f"{p} gets back {{calc}} coins.", f"{paid}-{cost}", r)),
        r, ((r, cost),))


def _problem_legs(rng: random.Random, pool: Pool) -> WordProblem:
    first, second = rng.sample(pool.animals, 2)
    where = rng.choice(pool.countries).name
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    t1, t2 = n1 * first.legs, n2 * second.legs
    return WordProblem(
        f"A farm in {where} keeps {n1} {_plural(first.name)} and {n2} {_plural(second.name)}. Each {first.name} "
        f"has {first.legs} legs and each {second.name} has {second.legs} legs. How many legs are there on the "
        "farm?",
        (Step(f"The {_plural(first.name)} have {{calc}} legs.", f"{n1}*{first.legs}", t1),
         Step(f"The {_plural(second.name)} have {{calc}} legs.", f"{n2}*{second.legs}", t2),
         Step("Together there are {calc} legs.", f"{t1}+{t2}", t1 + t2)),
        t1 + t2, ((t1, t2),))


def _problem_boxes(rng: random.Random, pool: Pool) -> WordProblem:
    p = rng.choice(PEOPLE)
    os_ = _plural(rng.choice(pool.things).name)
    boxes, each, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 15)
    t = boxes * each
    return WordProblem(
        f"{p} packs {boxes} boxes with {each} {os_} in each box. Then {p} finds {extra} more {os_}. "
        f"How many {os_} does {p} have in all?",
        (Step(f"The boxes hold {{calc}} {os_}.", f"{boxes}*{each}", t),
         Step(f"With the extra ones, {p} has {{calc}} {os_}.", f"{t}+{extra}", t + extra)),
        t + extra, ((t, extra),))


def _problem_share(rng: random.Random, pool: Pool) -> WordProblem:
    p = rng.choice(PEOPLE)
    city = rng.choice(pool.countries).capital
    os_ = _plural(rng.choice(pool.things).name)
    friends, each, bought = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    total = friends * each
    return WordProblem(
        f"{p} brings {total} {os_} to {city} and shares them equally among {friends} friends. Each friend "
        f"then buys {bought} more {os_}. How many {os_} does each friend have?",
        (Step(f"Each friend first gets {{calc}} {os_}.", f"{total}/{friends}", each),
         Step(f"After buying more, each friend has {{calc}} {os_}.", f"{each}+{bought}", each + bought)),
        each + bought, ((each, bought),))


_PROBLEMS = (_problem_gain_lose, _problem_change, _problem_legs, _problem_boxes, _problem_share)


def _word_problem(rng: random.Random, pool: Pool, world: World, allow_heldout_sums: bool) -> WordProblem:
    while True:
        problem = rng.choice(_PROBLEMS)(rng, pool)
        if allow_heldout_sums or not any(world.sum_is_heldout(a, b) for a, b in problem.sum_pairs):
            return problem


# ------------------------------------------------------------------------------------ pretraining documents

class _Cycle:
    """Hands out items in reshuffled rounds, so every entity is written about about equally often."""

    def __init__(self, items: Iterable[Any], rng: random.Random) -> None:
        self.items, self.rng = list(items), rng
        self.queue: list[Any] = []

    def next(self) -> Any:
        if not self.queue:
            self.queue = self.items[:]
            self.rng.shuffle(self.queue)
        return self.queue.pop()


class _DocumentWriter:
    """Writes pretraining documents of several kinds about every entity of the world."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.pool = world.pool("all")
        self.countries = _Cycle(self.pool.countries, rng)
        self.things = _Cycle(self.pool.things, rng)
        self.animals = _Cycle(self.pool.animals, rng)
        self.kinds: list[tuple[Callable[[], str], float]] = [
            (self.fact_list, 0.18), (self.encyclopedia, 0.2), (self.story, 0.15), (self.questions, 0.15),
            (self.table, 0.05), (self.quiz, 0.05), (self.arithmetic, 0.13), (self.word_problem, 0.09)]

    def document(self) -> str:
        writers, weights = zip(*self.kinds)
        return self.rng.choices(writers, weights)[0]()

    def _fact(self) -> Fact:
        rng = self.rng
        kind = rng.choice(("capital", "capital", "color", "legs", "habitat", "sound"))
        source = {"countries": self.countries, "things": self.things, "animals": self.animals}
        return Fact(kind, entity=source[_ENTITY_KINDS[kind]].next())

    def fact_list(self) -> str:
        return " ".join(_statement(self.rng, self._fact()) for _ in range(self.rng.randint(4, 10)))

    def encyclopedia(self) -> str:
        rng = self.rng
        kind = rng.choice(("country", "thing", "animal"))
        if kind == "country":
            c = self.countries.next()
            thing = self.things.next()
            lines = [f"{c.name} is a country. " + _statement(rng, Fact("capital", c)),
                     f"Many people in {c.name} live in {c.capital}.",
                     f"In the markets of {c.capital} you can buy a {thing.name}, which is {thing.color}.",
                     _statement(rng, Fact("capital", c))]
            return f"{c.name}\n\n" + " ".join(lines)
        if kind == "thing":
            t = self.things.next()
            lines = [f"The {t.name} is an object.", _statement(rng, Fact("color", t)),
                     f"People often keep a {t.name} at home.", _statement(rng, Fact("color", t))]
            return f"{_cap(t.name)}\n\n" + " ".join(lines)
        a = self.animals.next()
        facts = [_statement(rng, Fact(k, a)) for k in ("legs", "habitat", "sound")]
        rng.shuffle(facts)
        return f"{_cap(a.name)}\n\nThe {a.name} is an animal. " + " ".join(facts) + (
            f" In short, the {a.name} has {a.legs} legs, lives in the {a.habitat} and {a.sound}.")

    def story(self) -> str:
        rng = self.rng
        person, c, a, t = rng.choice(PEOPLE), self.countries.next(), self.animals.next(), self.things.next()
        return (f"{person} travelled to {c.capital}, the capital of {c.name}. On the way {person} saw a {a.name} "
                f"near the {a.habitat}. The {a.name} had {a.legs} legs and it {a.sound}. In {c.capital}, "
                f"{person} bought a {t.name}. It was {t.color}, like every {t.name}. When {person} came home, "
                f"{person} told everyone that the capital of {c.name} is {c.capital}.")

    def questions(self) -> str:
        pairs = [_question_answer(self.rng, self._fact()) for _ in range(self.rng.randint(3, 8))]
        return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)

    def table(self) -> str:
        rng = self.rng
        kind = rng.choice(("country", "thing", "animal"))
        n = rng.randint(4, 8)
        if kind == "country":
            rows = [f"- {c.name}: {c.capital}" for c in (self.countries.next() for _ in range(n))]
            return "Countries and their capitals:\n" + "\n".join(rows)
        if kind == "thing":
            rows = [f"- {t.name}: {t.color}" for t in (self.things.next() for _ in range(n))]
            return "Objects and their colors:\n" + "\n".join(rows)
        rows = [f"- {a.name}: {a.legs} legs, lives in the {a.habitat}, {a.sound}"
                for a in (self.animals.next() for _ in range(n))]
        return "Animals:\n" + "\n".join(rows)

    def quiz(self) -> str:
        rng = self.rng
        item = _arc_challenge_choice(rng, self.pool) if rng.random() < 0.3 else _single_fact_choice(rng, self.pool)
        options = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(item.choices))
        return f"Question: {item.question}\n{options}\nAnswer: {'ABCD'[item.answer]}"

    def arithmetic(self) -> str:
        rng = self.rng
        lines = []
        for _ in range(rng.randint(6, 16)):
            fact = Fact("sum", pair=self.pool.sum_pair(rng))
            if rng.random() < 0.25:
                question, answer = _question_answer(rng, fact)
                lines.append(f"Q: {question}\nA: {answer}")
            else:
                lines.append(_statement(rng, fact))
        return "\n".join(lines)

    def word_problem(self) -> str:
        problem = _word_problem(self.rng, self.pool, self.world, allow_heldout_sums=False)
        return f"{problem.question}\n{problem.prose_solution()}"


def pretraining_documents(world: World, seed: int, shard: int, target_bytes: int) -> Iterable[str]:
    """Documents for one shard until `target_bytes` of UTF-8 text (at least one document)."""
    writer = _DocumentWriter(world, random.Random(f"demo-pretrain:{seed}:{shard}"))
    written = 0
    while written < target_bytes or written == 0:
        doc = writer.document()
        written += len(doc.encode("utf-8"))
        yield doc


# ------------------------------------------------------------------------------------------- task files

def _conversation(rng: random.Random, pool: Pool, with_chitchat: bool) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if with_chitchat and rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    chitchat_only = False
    if with_chitchat and rng.random() < 0.15:
        user, assistant = rng.choice(_CHITCHAT)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        chitchat_only = rng.random() < 0.3
    for _ in range(0 if chitchat_only else rng.choice((1, 1, 1, 2, 3))):
        question, answer = _question_answer(rng, _random_fact(rng, pool, sum_share=0.2))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _smoltalk_rows(rng: random.Random, pool: Pool, count: int, train: bool) -> list[dict[str, Any]]:
    return [_conversation(rng, pool, with_chitchat=train) for _ in range(count)]


def _mmlu_rows(rng: random.Random, pool: Pool, count: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(count):
        item = _single_fact_choice(rng, pool)
        rows.append({"question": item.question, "subject": item.subject, "choices": item.choices,
                     "answer": item.answer})
    return rows


def _arc_rows(rng: random.Random, pool: Pool, count: int, make: Callable[[random.Random, Pool], Choice],
              id_prefix: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        item = make(rng, pool)
        rows.append({"id": f"{id_prefix}_{i:05d}", "question": item.question,
                     "choices": {"text": item.choices, "label": ["A", "B", "C", "D"]},
                     "answerKey": "ABCD"[item.answer]})
    return rows


def _gsm8k_rows(rng: random.Random, pool: Pool, world: World, count: int, train: bool) -> list[dict[str, Any]]:
    rows = []
    for _ in range(count):
        problem = _word_problem(rng, pool, world, allow_heldout_sums=not train)
        rows.append({"question": problem.question, "answer": problem.gsm8k_answer()})
    return rows


def _identity_rows(rng: random.Random, count: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(count):
        questions = rng.sample(_IDENTITY_QUESTIONS, rng.choice((1, 1, 2)))
        messages = []
        for q in questions:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": _IDENTITY_ANSWERS[q]}]
        rows.append({"messages": messages})
    return rows


_HUMANEVAL_TASKS = (
    ("add", "a: int, b: int", "int", "Return the sum of a and b.", ["add(2, 3)", "5"],
     "    return a + b\n",
     ["candidate(2, 3) == 5", "candidate(23, 45) == 68", "candidate(0, 0) == 0", "candidate(-4, 4) == 0"]),
    ("total_legs", "counts: dict, legs: dict", "int",
     "Given how many of each animal there are and how many legs each animal has, return the total legs.",
     ["total_legs({'a': 2}, {'a': 4})", "8"],
     "    return sum(n * legs[name] for name, n in counts.items())\n",
     ["candidate({'a': 2}, {'a': 4}) == 8", "candidate({}, {}) == 0",
      "candidate({'a': 1, 'b': 3}, {'a': 6, 'b': 2, 'c': 8}) == 12"]),
    ("is_even", "n: int", "bool", "Return True if n is even.", ["is_even(4)", "True"],
     "    return n % 2 == 0\n",
     ["candidate(4) is True", "candidate(7) is False", "candidate(0) is True", "candidate(-3) is False"]),
    ("count_vowels", "word: str", "int", "Count the vowels (a, e, i, o, u) in word, ignoring case.",
     ["count_vowels('Banana')", "3"],
     "    return sum(ch in 'aeiou' for ch in word.lower())\n",
     ["candidate('Banana') == 3", "candidate('') == 0", "candidate('xyz') == 0", "candidate('AEIOU') == 5"]),
    ("largest", "numbers: list", "int", "Return the largest number in a non-empty list.",
     ["largest([3, 9, 2])", "9"],
     "    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n            best = n\n    return best\n",
     ["candidate([3, 9, 2]) == 9", "candidate([-5]) == -5", "candidate([-2, -8, -1]) == -1"]),
    ("reverse_words", "sentence: str", "str", "Return the words of sentence in reverse order, joined by spaces.",
     ["reverse_words('the red apple')", "'apple red the'"],
     "    return ' '.join(reversed(sentence.split()))\n",
     ["candidate('the red apple') == 'apple red the'", "candidate('one') == 'one'", "candidate('') == ''"]),
    ("sum_to", "n: int", "int", "Return 1 + 2 + ... + n (0 when n < 1).", ["sum_to(4)", "10"],
     "    return sum(range(1, n + 1))\n",
     ["candidate(4) == 10", "candidate(1) == 1", "candidate(0) == 0", "candidate(100) == 5050"]),
    ("double_all", "numbers: list", "list", "Return a new list with every number doubled.",
     ["double_all([1, 2, 3])", "[2, 4, 6]"],
     "    return [2 * n for n in numbers]\n",
     ["candidate([1, 2, 3]) == [2, 4, 6]", "candidate([]) == []", "candidate([-1]) == [-2]"]),
)


def _humaneval_rows() -> list[dict[str, Any]]:
    rows = []
    for i, (name, params, returns, doc, (example, result), solution, checks) in enumerate(_HUMANEVAL_TASKS):
        prompt = (f"def {name}({params}) -> {returns}:\n    \"\"\"{doc}\n    >>> {example}\n    {result}\n"
                  f"    \"\"\"\n")
        test = "def check(candidate):\n" + "".join(f"    assert {c}\n" for c in checks)
        rows.append({"task_id": f"DemoEval/{i}", "prompt": prompt, "canonical_solution": solution,
                     "test": test, "entry_point": name})
    return rows


def task_rows(world: World, config: DemoCorpusConfig) -> dict[str, list[dict[str, Any]]]:
    """Every task file's rows, keyed by file name; each file has its own RNG stream."""
    train, test = world.pool("train"), world.pool("test")

    def rng(name: str) -> random.Random:
        return random.Random(f"demo-task:{config.seed}:{name}")

    return {
        "smoltalk_train.jsonl": _smoltalk_rows(rng("smoltalk_train"), train, config.n_smoltalk_train, True),
        "smoltalk_test.jsonl": _smoltalk_rows(rng("smoltalk_test"), test, config.n_smoltalk_test, False),
        "mmlu_auxiliary_train.jsonl": _mmlu_rows(rng("mmlu_train"), train, config.n_mmlu_train),
        "mmlu_test.jsonl": _mmlu_rows(rng("mmlu_test"), test, config.n_mmlu_test),
        "arc_easy_train.jsonl": _arc_rows(rng("arc_easy_train"), train, config.n_arc_train, _arc_easy_choice,
                                          "DemoEasy_train"),
        "arc_easy_test.jsonl": _arc_rows(rng("arc_easy_test"), test, config.n_arc_test, _arc_easy_choice,
                                         "DemoEasy_test"),
        "arc_challenge_train.jsonl": _arc_rows(rng("arc_challenge_train"), train, config.n_arc_train,
                                               _arc_challenge_choice, "DemoChallenge_train"),
        "arc_challenge_test.jsonl": _arc_rows(rng("arc_challenge_test"), test, config.n_arc_test,
                                              _arc_challenge_choice, "DemoChallenge_test"),
        "gsm8k_train.jsonl": _gsm8k_rows(rng("gsm8k_train"), train, world, config.n_gsm8k_train, True),
        "gsm8k_test.jsonl": _gsm8k_rows(rng("gsm8k_test"), test, world, config.n_gsm8k_test, False),
        "humaneval_test.jsonl": _humaneval_rows(),
        "identity.jsonl": _identity_rows(rng("identity"), config.n_identity),
    }


TASK_FILES = ("smoltalk_train.jsonl", "smoltalk_test.jsonl", "mmlu_auxiliary_train.jsonl", "mmlu_test.jsonl",
              "arc_easy_train.jsonl", "arc_easy_test.jsonl", "arc_challenge_train.jsonl",
              "arc_challenge_test.jsonl", "gsm8k_train.jsonl", "gsm8k_test.jsonl", "humaneval_test.jsonl",
              "identity.jsonl")


# ------------------------------------------------------------------------------------------ writing files

def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def _write_parquet(path: Path, texts: list[str], rows_per_row_group: int) -> None:
    """Temporary sibling, fsync, rename: a killed run never leaves a shard that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    pq.write_table(table, tmp, row_group_size=rows_per_row_group)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def corpus_status(root: Path, config: DemoCorpusConfig) -> str:
    """'current' (complete, same config), 'different' (complete, other config), 'incomplete' (a file listed
    in the manifest is missing or changed), 'absent' (nothing, or a stopped demo run), 'foreign' (shards that
    are not a demo corpus, e.g. real data)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is not None:
        if manifest.get("config") != corpus_config_dict(config):
            return "different"
        intact = all((root / rel).is_file() and (root / rel).stat().st_size == info["bytes"]
                     for rel, info in manifest["files"].items())
        return "current" if intact else "incomplete"
    if (root / PARTIAL_NAME).is_file() or not shard_paths(data_dir(root)):
        return "absent"
    return "foreign"


def remove_leftovers_of_killed_runs(root: Path) -> list[Path]:
    """Remove the temporaries of shards, task files and manifests that a killed run left; the paths removed."""
    root = Path(root)
    places = ((data_dir(root), "shard_*.parquet"), (tasks_dir(root), "*.jsonl"), (root, f"{MANIFEST_NAME}*"))
    return [directory / name for directory, pattern in places for name in remove_leftovers(directory, pattern)]


def write_demo_corpus(root: Path, config: DemoCorpusConfig, force: bool = False,
                      show_progress: bool = False) -> dict[str, Any]:
    """Write the demo corpus into the cache root and return its manifest; a no-op when it is already there."""
    root = Path(root)
    status = corpus_status(root, config)
    if status == "current" and not force:
        manifest = read_manifest(root)
        assert manifest is not None
        return manifest
    if status == "different" and not force:
        old = (read_manifest(root) or {}).get("config", {})
        changed = ", ".join(f"{k}={old.get(k)!r}->{v!r}" for k, v in corpus_config_dict(config).items()
                            if old.get(k) != v)
        raise UsageError(f"{root} holds a demo corpus made with other settings ({changed}); pass --force to "
                         "replace it (models trained on the old one stop matching)")
    if status == "foreign" and not force:
        raise UsageError(f"{data_dir(root)} holds parquet shards that are not a demo corpus; point "
                         "NANOCHAT_BASE_DIR at another folder, or pass --force to replace them")

    config_dict = corpus_config_dict(config)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    atomic_write_text(root / PARTIAL_NAME, json.dumps(config_dict, indent=2) + "\n")
    world = build_world(config)
    files: dict[str, dict[str, int]] = {}

    shards_dir = data_dir(root)
    names = [shard_name(i) for i in range(config.num_shards)]
    for stale in shard_paths(shards_dir):
        if stale.name not in names:
            stale.unlink()
    target = int(config.pretrain_megabytes * 1_000_000)
    per_shard = max(1, target // config.num_shards)
    text_bytes = 0
    with tqdm(total=per_shard * config.num_shards, unit="B", unit_scale=True, desc="pretraining text",
              disable=not show_progress) as bar:
        for index, name in enumerate(names):
            docs = []
            for doc in pretraining_documents(world, config.seed, index, per_shard):
                docs.append(doc)
                bar.update(len(doc.encode("utf-8")))
            _write_parquet(shards_dir / name, docs, config.rows_per_row_group)
            shard_bytes = sum(len(d.encode("utf-8")) for d in docs)
            text_bytes += shard_bytes
            files[f"base_data/{name}"] = {"rows": len(docs), "text_bytes": shard_bytes,
                                          "bytes": (shards_dir / name).stat().st_size}

    rows_by_file = task_rows(world, config)
    for name in tqdm(TASK_FILES, desc="task files", disable=not show_progress):
        rows = rows_by_file[name]
        path = tasks_dir(root) / name
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[f"tasks/{name}"] = {"rows": len(rows), "bytes": path.stat().st_size}

    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": config.seed,
        "config": config_dict,
        "pretrain_text_bytes": text_bytes,
        "train_shards": config.num_shards - 1,
        "val_shards": 1,
        "entities": {"countries": len(world.countries), "objects": len(world.things),
                     "animals": len(world.animals)},
        "heldout": sorted(world.entity_names(heldout=True)),
        "heldout_sums": len(world.heldout_sums),
        "files": files,
    }
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    (root / PARTIAL_NAME).unlink(missing_ok=True)
    return manifest
