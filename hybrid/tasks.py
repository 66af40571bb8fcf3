"""A checkable task set of short factual questions, built in code from tables.

`factual_tasks()` returns ~340 `hybrid.compare.Task`s (checker "contains": the answer is right when it
contains one of the accepted strings as whole words, case-folded). Seven topics, each a table of
(question subject, accepted answers): capitals, chemical symbols, units, authors, animals, conversions and
general science. Held out by topic from the planner's adaptation data (`planners/adapt/data.py`): no
country whose capital the adaptation prompts ask for appears here, and no adaptation template does
(`tests/test_tasks.py` checks both).

Used by `benchmarks/bench_tse.py` (TSE and its baselines as signals, accuracy per mode, the threshold
calibration) and by `hybrid compare --tasks factual`. Knows nothing about models.
"""

from __future__ import annotations

import hashlib

from hybrid.compare import Task

# capitals of countries the adaptation prompts never mention (planners/adapt/data.py COUNTRIES is disjoint)
CAPITALS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the United Kingdom", ("London",)), ("the United States", ("Washington",)), ("Iceland", ("Reykjavik",)),
    ("Scotland", ("Edinburgh",)), ("Wales", ("Cardiff",)), ("Czech Republic", ("Prague",)),
    ("Romania", ("Bucharest",)), ("Bulgaria", ("Sofia",)), ("Serbia", ("Belgrade",)), ("Croatia", ("Zagreb",)),
    ("Ukraine", ("Kyiv", "Kiev")), ("Belarus", ("Minsk",)), ("Lithuania", ("Vilnius",)), ("Latvia", ("Riga",)),
    ("Estonia", ("Tallinn",)), ("Slovakia", ("Bratislava",)), ("Slovenia", ("Ljubljana",)),
    ("Albania", ("Tirana",)), ("Georgia", ("Tbilisi",)), ("Armenia", ("Yerevan",)), ("Iran", ("Tehran",)),
    ("Iraq", ("Baghdad",)), ("Syria", ("Damascus",)), ("Lebanon", ("Beirut",)), ("Jordan", ("Amman",)),
    ("Saudi Arabia", ("Riyadh",)), ("Israel", ("Jerusalem",)), ("Afghanistan", ("Kabul",)),
    ("Pakistan", ("Islamabad",)), ("Bangladesh", ("Dhaka",)), ("Nepal", ("Kathmandu",)),
    ("Sri Lanka", ("Colombo", "Sri Jayawardenepura Kotte")), ("Malaysia", ("Kuala Lumpur",)),
    ("the Philippines", ("Manila",)), ("North Korea", ("Pyongyang",)),
    ("Mongolia", ("Ulaanbaatar", "Ulan Bator")), ("Taiwan", ("Taipei",)), ("New Zealand", ("Wellington",)),
    ("Ethiopia", ("Addis Ababa",)), ("Ghana", ("Accra",)), ("Senegal", ("Dakar",)), ("Algeria", ("Algiers",)),
    ("Tunisia", ("Tunis",)), ("Libya", ("Tripoli",)), ("Sudan", ("Khartoum",)), ("Uganda", ("Kampala",)),
    ("Zimbabwe", ("Harare",)), ("Venezuela", ("Caracas",)), ("Colombia", ("Bogota", "Bogotá")),
    ("Ecuador", ("Quito",)), ("Bolivia", ("La Paz", "Sucre")), ("Uruguay", ("Montevideo",)),
    ("Paraguay", ("Asuncion", "Asunción")), ("Jamaica", ("Kingston",)),
    ("Qatar", ("Doha",)), ("Kuwait", ("Kuwait City",)), ("Cyprus", ("Nicosia",)), ("Malta", ("Valletta",)),
)  # fmt: skip

SYMBOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hydrogen", ("H",)), ("lithium", ("Li",)), ("nitrogen", ("N",)),
    ("oxygen", ("O",)), ("neon", ("Ne",)), ("sodium", ("Na",)), ("magnesium", ("Mg",)),
    ("aluminium", ("Al",)), ("silicon", ("Si",)), ("phosphorus", ("P",)), ("chlorine", ("Cl",)), ("argon", ("Ar",)),
    ("potassium", ("K",)), ("calcium", ("Ca",)),
    ("titanium", ("Ti",)), ("chromium", ("Cr",)), ("manganese", ("Mn",)), ("iron", ("Fe",)),
    ("cobalt", ("Co",)), ("nickel", ("Ni",)), ("copper", ("Cu",)), ("zinc", ("Zn",)), ("bromine", ("Br",)),
    ("krypton", ("Kr",)), ("silver", ("Ag",)), ("tin", ("Sn",)), ("xenon", ("Xe",)), ("platinum", ("Pt",)),
    ("gold", ("Au",)), ("mercury", ("Hg",)), ("lead", ("Pb",)),
    ("radon", ("Rn",)), ("tungsten", ("W",)),
)  # fmt: skip

UNITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("length", ("metre", "meter")), ("mass", ("kilogram",)), ("time", ("second",)),
    ("electric current", ("ampere", "amp")), ("temperature", ("kelvin",)), ("amount of substance", ("mole",)),
    ("luminous intensity", ("candela",)), ("force", ("newton",)), ("energy", ("joule",)), ("power", ("watt",)),
    ("pressure", ("pascal",)), ("electric charge", ("coulomb",)), ("voltage", ("volt",)),
    ("electrical resistance", ("ohm",)), ("frequency", ("hertz",)), ("capacitance", ("farad",)),
    ("magnetic flux", ("weber",)), ("inductance", ("henry",)), ("radioactivity", ("becquerel",)),
    ("plane angle", ("radian",)), ("magnetic flux density", ("tesla",)), ("electrical conductance", ("siemens",)),
    ("area", ("square metre", "square meter")), ("volume", ("cubic metre", "cubic meter")),
    ("speed", ("metre per second", "meter per second", "m/s")),
)  # fmt: skip

AUTHORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Romeo and Juliet", ("Shakespeare",)), ("Hamlet", ("Shakespeare",)), ("Macbeth", ("Shakespeare",)),
    ("Pride and Prejudice", ("Austen",)), ("Emma", ("Austen",)), ("1984", ("Orwell",)),
    ("Animal Farm", ("Orwell",)), ("Oliver Twist", ("Dickens",)), ("A Christmas Carol", ("Dickens",)),
    ("Great Expectations", ("Dickens",)), ("War and Peace", ("Tolstoy",)), ("Anna Karenina", ("Tolstoy",)),
    ("Crime and Punishment", ("Dostoevsky", "Dostoyevsky")), ("The Odyssey", ("Homer",)), ("The Iliad", ("Homer",)),
    ("Don Quixote", ("Cervantes",)), ("Moby-Dick", ("Melville",)), ("The Old Man and the Sea", ("Hemingway",)),
    ("The Great Gatsby", ("Fitzgerald",)), ("Frankenstein", ("Shelley",)), ("Dracula", ("Stoker",)),
    ("Harry Potter and the Philosopher's Stone", ("Rowling",)), ("The Hobbit", ("Tolkien",)),
    ("The Lord of the Rings", ("Tolkien",)), ("Alice's Adventures in Wonderland", ("Carroll",)),
    ("The Adventures of Tom Sawyer", ("Twain",)), ("Adventures of Huckleberry Finn", ("Twain",)),
    ("To Kill a Mockingbird", ("Harper Lee",)), ("Jane Eyre", ("Charlotte Bronte", "Brontë", "Bronte")),
    ("Wuthering Heights", ("Emily Bronte", "Brontë", "Bronte")), ("The Divine Comedy", ("Dante",)),
    ("Les Misérables", ("Hugo",)), ("The Hunchback of Notre-Dame", ("Hugo",)),
    ("The Three Musketeers", ("Dumas",)), ("Twenty Thousand Leagues Under the Seas", ("Verne",)),
    ("Around the World in Eighty Days", ("Verne",)), ("The Time Machine", ("Wells",)),
    ("The War of the Worlds", ("Wells",)), ("Brave New World", ("Huxley",)), ("The Catcher in the Rye", ("Salinger",)),
    ("Of Mice and Men", ("Steinbeck",)), ("The Grapes of Wrath", ("Steinbeck",)), ("Gulliver's Travels", ("Swift",)),
    ("Robinson Crusoe", ("Defoe",)), ("Treasure Island", ("Stevenson",)), ("The Jungle Book", ("Kipling",)),
    ("The Little Prince", ("Saint-Exupéry", "Exupery", "Exupéry")), ("Faust", ("Goethe",)),
    ("The Origin of Species", ("Darwin",)), ("A Brief History of Time", ("Hawking",)),
    ("The Raven", ("Poe",)), ("Charlie and the Chocolate Factory", ("Dahl",)),
)  # fmt: skip

BABY_ANIMALS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dog", ("puppy", "pup")), ("cat", ("kitten", "kitty")), ("cow", ("calf",)), ("horse", ("foal", "colt", "filly")),
    ("sheep", ("lamb",)), ("goat", ("kid",)), ("pig", ("piglet",)), ("duck", ("duckling",)), ("goose", ("gosling",)),
    ("frog", ("tadpole",)), ("kangaroo", ("joey",)), ("bear", ("cub",)), ("lion", ("cub",)), ("deer", ("fawn",)),
    ("swan", ("cygnet",)), ("owl", ("owlet",)), ("hen", ("chick",)), ("butterfly", ("caterpillar", "larva")),
    ("eagle", ("eaglet",)), ("whale", ("calf",)), ("rabbit", ("kit", "bunny", "kitten")),
    ("fox", ("kit", "cub", "pup")),
)  # fmt: skip

ANIMAL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a whale", ("mammal",)), ("a dolphin", ("mammal",)), ("a bat", ("mammal",)), ("a frog", ("amphibian",)),
    ("a salamander", ("amphibian",)), ("a snake", ("reptile",)), ("a crocodile", ("reptile",)),
    ("a lizard", ("reptile",)), ("a turtle", ("reptile",)), ("a shark", ("fish",)), ("a salmon", ("fish",)),
    ("a penguin", ("bird",)), ("an ostrich", ("bird",)), ("a spider", ("arachnid",)), ("a scorpion", ("arachnid",)),
    ("a bee", ("insect",)), ("an ant", ("insect",)), ("a beetle", ("insect",)), ("a crab", ("crustacean",)),
    ("a lobster", ("crustacean",)), ("an octopus", ("mollusc", "mollusk", "cephalopod")),
    ("a snail", ("mollusc", "mollusk", "gastropod")), ("a kangaroo", ("marsupial", "mammal")),
    ("a koala", ("marsupial", "mammal")), ("a platypus", ("monotreme", "mammal")),
)  # fmt: skip

ANIMAL_FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the largest animal on Earth?", ("blue whale",)),
    ("What is the fastest land animal?", ("cheetah",)),
    ("What is the tallest animal?", ("giraffe",)),
    ("Which bird is a symbol of peace?", ("dove",)),
    ("What do bees make?", ("honey",)),
    ("What do caterpillars turn into?", ("butterfly", "butterflies", "moth")),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the largest land animal?", ("elephant",)),
    ("What do pandas mostly eat?", ("bamboo",)),
    ("Which animal has a trunk?", ("elephant",)),
    ("Which animal carries its baby in a pouch?", ("kangaroo", "marsupial", "koala")),
    ("What is a group of wolves called?", ("pack",)),
    ("What is a group of fish called?", ("school", "shoal")),
    ("What is a group of lions called?", ("pride",)),
    ("What is a group of cows called?", ("herd",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many legs does an insect have?", ("6", "six")),
    ("How many legs does a dog have?", ("4", "four")),
    ("How many hearts does an octopus have?", ("3", "three")),
    ("What is the only mammal that can fly?", ("bat",)),
)

# (question, accepted answers): simple unit conversions and counts
CONVERSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("How many seconds are in a minute?", ("60", "sixty")),
    ("How many hours are in a day?", ("24", "twenty-four")),
    ("How many days are in a week?", ("7", "seven")),
    ("How many months are in a year?", ("12", "twelve")),
    ("How many days are in a leap year?", ("366",)),
    ("How many days are in a normal year?", ("365",)),
    ("How many weeks are in a year?", ("52", "fifty-two")),
    ("How many years are in a century?", ("100", "hundred")),
    ("How many years are in a decade?", ("10", "ten")),
    ("How many centimetres are in a metre?", ("100", "hundred")),
    ("How many millimetres are in a centimetre?", ("10", "ten")),
    ("How many metres are in a kilometre?", ("1000", "1,000", "thousand")),
    ("How many grams are in a kilogram?", ("1000", "1,000", "thousand")),
    ("How many millilitres are in a litre?", ("1000", "1,000", "thousand")),
    ("How many inches are in a foot?", ("12", "twelve")),
    ("How many feet are in a yard?", ("3", "three")),
    ("How many ounces are in a pound?", ("16", "sixteen")),
    ("How many pounds are in a stone?", ("14", "fourteen")),
    ("How many cents are in a dollar?", ("100", "hundred")),
    ("How many things are in a dozen?", ("12", "twelve")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many sides does a square have?", ("4", "four")),
    ("How many sides does a hexagon have?", ("6", "six")),
    ("How many sides does an octagon have?", ("8", "eight")),
    ("How many sides does a pentagon have?", ("5", "five")),
    ("How many degrees are in a right angle?", ("90", "ninety")),
    ("How many degrees are in a full circle?", ("360",)),
    ("How many degrees are in a triangle's angles altogether?", ("180",)),
    ("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ("At what temperature in Celsius does water boil at sea level?", ("100",)),
    ("At what temperature in Fahrenheit does water freeze?", ("32",)),
    ("How many bytes are in a kilobyte?", ("1000", "1024", "1,000", "1,024")),
    ("How many bits are in a byte?", ("8", "eight")),
    ("How many players are on a football (soccer) team on the field?", ("11", "eleven")),
    ("How many continents are there?", ("7", "seven")),
    ("How many planets are in the solar system?", ("8", "eight")),
    ("How many colours are in a rainbow?", ("7", "seven")),
    ("How many letters are in the English alphabet?", ("26", "twenty-six")),
    ("How many strings does a standard guitar have?", ("6", "six")),
    ("How many keys does a standard piano have?", ("88",)),
    ("How many squares are on a chessboard?", ("64",)),
    ("How many cards are in a standard deck?", ("52",)),
    ("How many teeth does an adult human usually have?", ("32",)),
    ("How many bones are in the adult human body?", ("206",)),
)

SCIENCE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("Which planet has the most famous rings?", ("Saturn",)),
    ("What is the hottest planet in the solar system?", ("Venus",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What is the natural satellite of the Earth called?", ("Moon",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("What is the largest organ of the human body?", ("skin",)),
    ("Which organ pumps blood through the body?", ("heart",)),
    ("Which organ do humans use to breathe?", ("lungs", "lung")),
    ("Which organ controls the body and thinks?", ("brain",)),
    ("What colour do you get by mixing blue and yellow?", ("green",)),
    ("What colour do you get by mixing red and white?", ("pink",)),
    ("What colour do you get by mixing red and yellow?", ("orange",)),
    ("What colour do you get by mixing blue and red?", ("purple", "violet")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the largest desert in the world?", ("Sahara", "Antarctic", "Antarctica")),
    ("What is the smallest planet in the solar system?", ("Mercury",)),
    ("On which continent is Egypt?", ("Africa",)),
    ("On which continent is Argentina?", ("South America",)),
    ("On which continent is Japan?", ("Asia",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who discovered penicillin?", ("Fleming",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
    ("Who invented the telephone?", ("Bell",)),
    ("Who invented the light bulb?", ("Edison",)),
    ("Who proposed the laws of motion and gravity?", ("Newton",)),
    ("What is frozen water called?", ("ice",)),
    ("What is the main language spoken in Iceland?", ("Icelandic",)),
    ("What is the main language spoken in Colombia?", ("Spanish",)),
    ("What is the currency of the United Kingdom?", ("pound", "sterling")),
    ("What is the currency of the United States?", ("dollar",)),
    ("What is the currency of Switzerland?", ("franc",)),
    ("What is the currency of India?", ("rupee",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of Russia?", ("ruble", "rouble")),
    ("What is the currency of Mexico?", ("peso",)),
)

TOPICS: tuple[str, ...] = ("capital", "symbol", "unit", "author", "animal", "conversion", "science")


def _id(topic: str, subject: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in subject.casefold()).strip("-")
    slug = "-".join(p for p in slug.split("-") if p)[:40]
    return f"{topic}-{slug}-{hashlib.sha1(subject.encode()).hexdigest()[:4]}"


def factual_tasks() -> list[Task]:
    """Every task, in table order (deterministic). `kind` names the topic (see TOPICS)."""
    out: list[Task] = []

    def add(topic: str, question: str, answers: tuple[str, ...], subject: str | None = None) -> None:
        out.append(Task(_id(topic, subject or question), question, "contains", list(answers), topic))

    for c, a in CAPITALS:
        add("capital", f"What is the capital of {c}?", a, c)
    for e, a in SYMBOLS:
        add("symbol", f"What is the chemical symbol for {e}?", a, e)
    for q, a in UNITS:
        add("unit", f"What is the SI unit of {q}?", a, q)
    for b, a in AUTHORS:
        add("author", f"Who wrote {b}?", a, b)
    for x, a in BABY_ANIMALS:
        add("animal", f"What is a baby {x} called?", a, "baby " + x)
    for x, a in ANIMAL_CLASSES:
        add("animal", f"What class of animal is {x}?", a, x)
    for q, a in ANIMAL_FACTS:
        add("animal", q, a)
    for q, a in CONVERSIONS:
        add("conversion", q, a)
    for q, a in SCIENCE:
        add("science", q, a)
    return out


def subsample(tasks: list[Task], n: int | None, seed: int = 0) -> list[Task]:
    """`n` tasks spread over the topics (every k-th of a seeded shuffle, stratified by kind); all if n is None."""
    if n is None or n >= len(tasks):
        return list(tasks)
    import random

    rng = random.Random(seed)
    by: dict[str, list[Task]] = {}
    for t in tasks:
        by.setdefault(t.kind, []).append(t)
    for v in by.values():
        rng.shuffle(v)
    out: list[Task] = []
    i = 0
    while len(out) < n:  # round robin over topics, in proportion to their size
        for v in by.values():
            take = max(1, round(len(v) * n / len(tasks)))
            if i < len(v) and i < take and len(out) < n:
                out.append(v[i])
        i += 1
        if i > max(len(v) for v in by.values()):
            break
    if len(out) < n:  # rounding left a few slots: fill them from what is left, in the same shuffled order
        taken = {t.id for t in out}
        out += [t for v in by.values() for t in v if t.id not in taken][: n - len(out)]
    return out
