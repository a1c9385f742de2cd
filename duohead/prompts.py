"""Built-in long prompts: the evaluation haystacks, passkey and needle samples, and the demo document.

The needle haystack is encyclopedic prose written for duohead's evaluation (short essays on crafts,
tools and natural history), deliberately unlike the calibration haystack (`duohead.calibrate.haystack`,
village stories from templates), so an evaluation never replays the calibration data. It holds no digits,
so it never competes with a passkey. The passkey filler is the classic one of Mohtashami & Jaggi (2023).
Every sample is a deterministic function of its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ESSAYS = (
    "Stone arch bridges stand because every block pushes against its neighbours. The builders raised a wooden frame "
    "called centring, laid the voussoirs over it and set the keystone last; only then could the frame be struck. A "
    "well-made arch carries its load as pure compression, which is why so many have outlived the roads they served.",
    "Honeybees keep the brood nest close to the warmth of a human body. In cold weather the workers cluster and "
    "shiver their flight muscles without moving their wings, and the colony rotates so that no bee stays on the "
    "chilly outside for long. In summer they fan water droplets across the comb to cool it.",
    "Glassblowers gather molten glass on the end of a hollow iron pipe and turn it constantly so that it does not "
    "sag. A puff of breath opens a bubble, and the shape is coaxed out with wet wooden blocks, tweezers and "
    "gravity. The finished piece must cool slowly in an annealing oven, or hidden stresses will crack it later.",
    "Early mapmakers filled the edges of the known world with rumour. Coastlines were drawn from the reports of "
    "sailors, rivers from the accounts of traders, and mountains were often placed where a traveller had merely "
    "seen them on the horizon. Surveying with chains and theodolites slowly replaced guesswork with measurement.",
    "Tea leaves, green or black, come from the same evergreen shrub. What differs is the handling after picking: "
    "green tea is heated quickly to stop the leaf from browning, while black tea is rolled and left to oxidise "
    "until it darkens. Oolong sits between the two, bruised at the edges and stopped part of the way.",
    "A pendulum clock keeps time because a swinging weight returns at a nearly constant rhythm. The escapement "
    "releases the gear train one tooth at a time and gives the pendulum a tiny push on each swing. Clockmakers "
    "fought temperature with rods of different metals, since a longer pendulum in summer runs slow.",
    "Volcanic islands are born in the deep sea and grow until they break the surface. Lava that cools in water "
    "forms rounded pillows; lava that cools in air builds shields and cones. Once the island drifts away from its "
    "hot spot, rain and waves wear it down, and coral may keep growing around the sinking rim as an atoll.",
    "Bookbinders fold printed sheets into sections, sew the sections together along the spine and glue a strip "
    "of mull across the back. Boards are covered with cloth or leather and attached by the hinges. A good binding "
    "opens flat without strain and closes again without gaping, even after years on the shelf.",
    "Lichens are partnerships between a fungus and an alga or a cyanobacterium. The fungus provides shelter and "
    "gathers water and minerals, while its partner makes sugar from sunlight. Together they colonise bare rock, "
    "tree bark and old roofs, growing so slowly that some patches are older than the buildings beneath them.",
    "Canal locks lift boats up a hill by letting water do the work. A boat enters the chamber, the gates close "
    "behind it and paddles open to fill the chamber from the higher level. When the water inside matches the "
    "water ahead, the upper gates swing open and the boat moves on, having climbed without an engine.",
    "Sourdough bread rises on a culture of wild yeasts and lactic bacteria kept alive in flour and water. The "
    "bacteria give the loaf its sour tang and help it keep; the yeasts give off the gas that lifts the dough. "
    "Bakers feed the starter daily and judge its strength by smell and by how much it has grown.",
    "Migrating birds find their way with several compasses at once. They read the position of the sun, the "
    "pattern of the stars around the celestial pole and the lines of the magnetic field, and they learn landmarks "
    "such as coastlines and mountain ranges. Young birds on their first journey often rely on instinct alone.",
    "Weavers set up the warp threads on the loom before a single row of cloth is made, and that preparation can "
    "take longer than the weaving itself. The weft is passed between raised and lowered warp threads, and the "
    "order in which the shafts are lifted decides the pattern: plain weave, twill, satin or something richer.",
    "Limestone caves are carved by rainwater that has picked up carbon dioxide from the soil and become a weak "
    "acid. Over a very long time it widens cracks into passages. Where the water drips into open air it loses "
    "the gas again and leaves calcite behind, building stalactites from the ceiling and stalagmites from the floor.",
    "Windmills were among the first machines to turn the motion of the weather into useful work. The sails faced "
    "the wind, turned by hand on early post mills and later by a small fantail on tower mills. Inside, the "
    "millstones had to be dressed regularly with fresh grooves so that they would cut the grain rather than crush it.",
    "Printing with movable type depended on an alloy that melted easily, filled every corner of the mould and "
    "expanded slightly as it cooled, giving each letter a crisp face. Compositors set the letters upside down and "
    "backwards in a hand-held stick, line by line, then locked the page into a frame for the press.",
)

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE_INTRO = "Read the document below and answer the question at the end."
# (fact with a {word} slot, question, answer prefix); the word is drawn from NEEDLE_WORDS.
NEEDLE_FACTS = (
    (
        "The secret word for the museum vault is {word}.",
        "What is the secret word for the museum vault?",
        "The secret word for the museum vault is",
    ),
    (
        "The name of the lighthouse keeper's cat is {word}.",
        "What is the name of the lighthouse keeper's cat?",
        "The name of the lighthouse keeper's cat is",
    ),
    (
        "The password of the old observatory is {word}.",
        "What is the password of the old observatory?",
        "The password of the old observatory is",
    ),
    (
        "The ship that carried the first map of the islands was called {word}.",
        "What was the ship that carried the first map of the islands called?",
        "The ship that carried the first map of the islands was called",
    ),
)
NEEDLE_WORDS = (
    "Tangerine",
    "Obsidian",
    "Harmonica",
    "Walrus",
    "Juniper",
    "Kaleidoscope",
    "Marzipan",
    "Periwinkle",
    "Saffron",
    "Tambourine",
    "Velvet",
    "Zeppelin",
    "Cinnamon",
    "Gargoyle",
    "Nightingale",
    "Quartz",
)

DEMO_FACT = "The code that opens the observatory door is {code}."
DEMO_QUESTION = "What is the code that opens the observatory door? Reply with the code only."
DEMO_CODE = "48613"
DEMO_DEPTH = 0.6
DEMO_TOKENS = 3500


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt: `answers` are the strings a correct completion contains (all of them)."""

    task: str  # "passkey", "needle" or a RULER task (`duohead.ruler`)
    length: int  # target prompt length in tokens
    depth: float | None  # where the fact sits in the haystack, 0 = start, 1 = end; None: seeded per needle (RULER)
    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        """The answers as one string, as a result row records them."""
        return ", ".join(self.answers)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def essay_stream(seed: int):
    """Endless essay paragraphs: every round is a fresh seeded shuffle of `ESSAYS`."""
    rng = random.Random(seed)
    while True:
        order = list(ESSAYS)
        rng.shuffle(order)
        yield from order


def check_frame(task: str, frame: int, length: int) -> None:
    """Raise ValueError when a prompt's fixed text (`frame` tokens) alone exceeds the requested `length`."""
    if frame > length:
        raise ValueError(f"a {task} prompt needs at least {frame} tokens with this tokenizer; got --lengths {length}")


def fill(tokenizer, units, budget: int) -> list[str]:
    """Take text units from the iterable `units` while their token count stays within `budget`."""
    taken: list[str] = []
    used = 0
    for unit in units:
        cost = _count(tokenizer, " " + unit)
        if used + cost > budget:
            break
        taken.append(unit)
        used += cost
    return taken


def insert_at_depth(units: list[str], fact: str, depth: float) -> list[str]:
    """`units` with `fact` inserted at the unit boundary nearest to fraction `depth` of the units."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    at = round(depth * len(units))
    return units[:at] + [fact] + units[at:]


def passkey_sample(tokenizer, length: int, depth: float, seed: int) -> Sample:
    """A passkey prompt of about `length` tokens: a five-digit key inside repeated filler at `depth`."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    frame = _count(tokenizer, f"{PASSKEY_INTRO} {needle} {PASSKEY_QUESTION}")
    check_frame("passkey", frame, length)
    filler = fill(tokenizer, iter(lambda: PASSKEY_FILLER, None), length - frame)
    body = " ".join(insert_at_depth(filler, needle, depth))
    return Sample("passkey", length, depth, f"{PASSKEY_INTRO} {body} {PASSKEY_QUESTION}", (key,))


def needle_sample(tokenizer, length: int, depth: float, seed: int) -> Sample:
    """A needle prompt of about `length` tokens: a one-word fact inside essay prose at `depth`."""
    rng = random.Random(seed)
    fact, question, answer_prefix = rng.choice(NEEDLE_FACTS)
    word = rng.choice(NEEDLE_WORDS)
    needle = fact.format(word=word)
    tail = f"Question: {question}\nAnswer: {answer_prefix}"
    frame = _count(tokenizer, f"{NEEDLE_INTRO}\n\n {needle}\n\n{tail}")
    check_frame("needle", frame, length)
    essays = fill(tokenizer, essay_stream(seed), length - frame)
    body = " ".join(insert_at_depth(essays, needle, depth))
    return Sample("needle", length, depth, f"{NEEDLE_INTRO}\n\n{body}\n\n{tail}", (word,))


SAMPLERS = {"passkey": passkey_sample, "needle": needle_sample}


def demo_document(tokenizer) -> tuple[str, str]:
    """The demo's (user message, expected answer): a ~3.5K-token document with a code buried at 60% depth
    and a question about it."""
    fact = DEMO_FACT.format(code=DEMO_CODE)
    essays = fill(tokenizer, essay_stream(0), DEMO_TOKENS - _count(tokenizer, f"{fact}\n\n{DEMO_QUESTION}"))
    body = " ".join(insert_at_depth(essays, fact, DEMO_DEPTH))
    return f"{body}\n\n{DEMO_QUESTION}", DEMO_CODE
