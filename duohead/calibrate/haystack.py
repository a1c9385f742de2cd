"""The built-in haystack: plain English prose generated deterministically from a seed (no download).

Sentences come from templates over small word lists (a village, its weather, trades, travels and
small events), grouped into paragraphs. Any seed gives a different, unbounded, natural-looking text.
The word lists contain no NATO-alphabet word and no digit, so they never collide with passkeys.
"""

from __future__ import annotations

import random

NAMES = (
    "Ada",
    "Bertram",
    "Clara",
    "Dorian",
    "Elsie",
    "Fenwick",
    "Greta",
    "Hollis",
    "Ivy",
    "Jasper",
    "Lena",
    "Marius",
    "Nell",
    "Orrin",
    "Pearl",
    "Quentin",
    "Rosa",
    "Silas",
    "Tilda",
    "Ulric",
    "Vera",
    "Walter",
    "Wren",
    "Agnes",
    "Basil",
    "Cora",
    "Edmund",
    "Flora",
    "Gideon",
    "Hattie",
    "Ida",
    "Leopold",
    "Maud",
    "Ned",
    "Olive",
    "Percy",
)
PLACES = (
    "the mill",
    "the old bridge",
    "the harbour",
    "the orchard",
    "the chapel",
    "the market square",
    "the bakery",
    "the north field",
    "the ferry landing",
    "the schoolhouse",
    "the forge",
    "the lighthouse",
    "the inn by the road",
    "the river bend",
    "the upper pasture",
    "the weaver's cottage",
    "the stone quarry",
    "the library",
    "the station",
    "the greenhouse",
    "the boatyard",
    "the town hall",
    "the pine wood",
    "the salt marsh",
    "the apple store",
)
TIMES = (
    "In the early morning",
    "Late in the afternoon",
    "Just after dawn",
    "Towards evening",
    "On the first warm day",
    "During the long winter",
    "At the end of the harvest",
    "On a grey Sunday",
    "Before the first frost",
    "In the middle of the fair",
    "After the spring floods",
    "On the night of the storm",
    "At midsummer",
    "Some years ago",
    "Every autumn",
    "When the swallows returned",
)
WEATHER = (
    "the wind came in cold off the sea",
    "a soft rain fell on the roofs",
    "the sky was clear and pale",
    "fog lay thick along the river",
    "the sun stood low over the hills",
    "snow drifted against the fences",
    "the air smelled of cut hay",
    "thunder rolled somewhere to the west",
    "the frost had silvered every gate",
    "a warm breeze moved through the barley",
    "clouds hurried over the church tower",
    "the light was gold and slow",
)
OBJECTS = (
    "a basket of pears",
    "an old brass lantern",
    "a letter sealed with wax",
    "a bundle of firewood",
    "a copper kettle",
    "a map of the coast",
    "a jar of honey",
    "a pair of leather boots",
    "a wooden flute",
    "a sack of flour",
    "a chipped blue teapot",
    "a coil of rope",
    "a box of seedlings",
    "a worn prayer book",
    "a loaf of rye bread",
    "a sketchbook full of birds",
    "a broken clock",
    "a crate of apples",
    "a woollen shawl",
    "a fishing net",
)
ACTIONS = (
    "carried {obj} down to {place}",
    "left {obj} on the step of {place}",
    "found {obj} behind {place}",
    "traded {obj} for news at {place}",
    "mended {obj} by the fire",
    "brought {obj} as a gift to {name}",
    "sold {obj} at {place} for a fair price",
    "wrapped {obj} in paper and walked to {place}",
    "lost {obj} somewhere between home and {place}",
    "painted {obj} while sitting near {place}",
)
FEELINGS = (
    "quietly pleased",
    "a little tired",
    "uneasy but curious",
    "warm and unhurried",
    "restless",
    "hopeful",
    "amused by the whole affair",
    "thoughtful",
    "proud of the work",
    "homesick for the hills",
)
REMARKS = (
    "Nobody could remember a year quite like it.",
    "The children talked about it for weeks afterwards.",
    "It was the kind of thing that happened only in small towns.",
    "The old people said the signs had been there all along.",
    "Most of the neighbours agreed that it had been a good decision.",
    "Later it became one of the stories told at the inn.",
    "There was, after all, plenty of work still to do.",
    "The matter was settled over a pot of strong tea.",
    "No one thought much of it at the time.",
    "It took the rest of the season to put things right.",
)
TRADES = (
    "baker",
    "ferryman",
    "schoolteacher",
    "blacksmith",
    "miller",
    "beekeeper",
    "carpenter",
    "shepherd",
    "lamplighter",
    "weaver",
    "fisherman",
    "postmistress",
    "gardener",
    "clockmaker",
    "doctor",
    "innkeeper",
)
ANIMALS = (
    "the grey heron",
    "a fox",
    "the miller's dog",
    "a flock of starlings",
    "two hares",
    "an old carthorse",
    "the geese",
    "a barn owl",
    "the black cat from the bakery",
    "a family of otters",
    "the bees",
    "a robin",
)
ANIMAL_DOINGS = (
    "waited patiently at the water's edge",
    "crossed the lane without hurry",
    "slept in the shade of the wall",
    "circled the tower twice and flew off",
    "followed the cart all the way home",
    "watched from the hedge",
    "made a nest under the eaves",
    "stole a crust from the window sill",
    "grazed along the ditch",
)
SENTENCES = (
    "{time}, {weather}.",
    "{time}, {name} {action}.",
    "{name}, the {trade}, {action}.",
    "{name} {action}, feeling {feeling}.",
    "Near {place}, {animal} {animal_doing}.",
    "{remark}",
    "{name} and {name2} met at {place} and spoke about the weather, the prices, and the road.",
    "The {trade} at {place} kept {obj} on a high shelf, where no one was allowed to touch it.",
    "Whenever {weather}, {name} would walk to {place} and stay there until supper.",
    "{name} once said that {place} looked its best when {weather}.",
    "It was {name} who first noticed that {animal} {animal_doing}.",
    "By the time {name2} arrived at {place}, {name} had already {action}.",
    "People still argue about what {name} meant to do with {obj}.",
    "The road to {place} was long, and {name} was {feeling} by the end of it.",
    "{time}, the {trade} opened the shutters of {place} and looked out.",
)


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def sentence(rng: random.Random) -> str:
    """One sentence of haystack prose."""
    name, name2 = rng.sample(NAMES, 2)
    action = _pick(rng, ACTIONS).format(obj=_pick(rng, OBJECTS), place=_pick(rng, PLACES), name=name2)
    fields = {
        "time": _pick(rng, TIMES),
        "weather": _pick(rng, WEATHER),
        "name": name,
        "name2": name2,
        "action": action,
        "feeling": _pick(rng, FEELINGS),
        "place": _pick(rng, PLACES),
        "animal": _pick(rng, ANIMALS),
        "animal_doing": _pick(rng, ANIMAL_DOINGS),
        "remark": _pick(rng, REMARKS),
        "trade": _pick(rng, TRADES),
        "obj": _pick(rng, OBJECTS),
    }
    return _pick(rng, SENTENCES).format(**fields)


def paragraph(rng: random.Random) -> str:
    """A paragraph of 3 to 7 sentences."""
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def generate(rng: random.Random, min_words: int) -> str:
    """At least `min_words` words of prose, paragraphs separated by blank lines."""
    paragraphs: list[str] = []
    words = 0
    while words < min_words:
        paragraphs.append(paragraph(rng))
        words += len(paragraphs[-1].split())
    return "\n\n".join(paragraphs)
