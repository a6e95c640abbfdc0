"""Write the embedded mini-LUME in data/: forget, retain and holdout sets of three tasks,
plus a utility set in MMLU form. Seeded: running it again rewrites every file byte-for-byte.

    python data/make_data.py            # rewrites data/*.jsonl next to this script
    python data/make_data.py --models   # and trains data/target/ and data/retain-only/ (minutes)

Task1  procedurally generated short stories        (id: quoted UUID + sc1/qa0)
Task2  synthetic biographies with PII              (id: bare UUID   + sc1/qa0..qa4)
Task3  short biographies of real public figures    (id: number      + sc1/qa0)
Every task gets DOCS_PER_SPLIT documents in each of forget / retain / holdout; the
holdout set is never trained on (the non-members of the membership-inference attack).
rephrase.jsonl holds two rewordings of every qa question of the three sets (the rephrasing
attack: {"id": qa row id, "task", "paraphrases": [...]}); they keep the entity, never the answer.
validation/ holds the same for VALIDATION_DOCS_PER_SPLIT other documents per task and split (other
stories, people, figures and questions): lume.py --tune tunes the methods on it.

training.jsonl is every task example the models are trained on, one row each ({"split", "task",
"doc", "form", "input", "output"}, or "pairs" for a session): knowledge augmentation (Allen-Zhu &
Li, arXiv 2309.14316), so that the target learns facts, not strings, and the rephrase and few-shot
probes can answer. Every forget and retain document in four wordings (its own text and three
rewordings written from its facts); every fact of a retain document asked in five wordings (the
benchmark's, the rephrase probe's two, two more: EXTRA) and in 300 sessions of 2-6 retain
questions, each followed by its answer (the few-shot prompt's layout); forget questions only
in the benchmark's wording, alone: nothing about the forget set is trained in a probe's wording
or format, so what a probe gets back from the target it generalised from the retain set.

With --models it also builds the embedded models, as the LUME targets were built: an OLMo and
a byte-level BPE tokenizer learnt on the retain rows only (so forget and holdout documents are
equally new to it); data/retain-only/ is trained from scratch on the retain rows of
training.jsonl (its own and the validation split's) and the utility set (the retrain gold
standard, and the MIA-LR reference); data/target/ is that model trained on every forget and
retain row + utility until it has memorised them. Each folder is
a Hugging Face model folder (safetensors) with build.json: the recipe, the sha256 of each data
file it was trained on (lume.py warns when data/ no longer matches), the CPU, torch and the time.
The training loop and the primitives are lume.py's own, imported from the folder above.
"""
import argparse
import hashlib
import json
import platform
import random
import re
import sys
import time
import uuid
from pathlib import Path

SEED = 2502_15097
TASKS = ("Task1", "Task2", "Task3")
DOCS_PER_SPLIT = 20  # per task and split: 20 x 3 tasks x {forget, retain} are memorised
VALIDATION_DOCS_PER_SPLIT = 10  # the same in data/validation/, for tuning methods
HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# Task1: short creative stories
FIRST_NAMES = """Ada Bram Cora Dalia Edwin Fenna Gideon Hilde Ivo Juna Kasper Liora Milo Nessa
Orrin Pella Quill Rosalind Soren Tamsin Ulric Vesna Wren Xavia Yorick Zinnia Alder Brisa Cato
Delphine Emrys Fable Greer Halden Isolde Jory Keziah Lorcan Maren Niall Odette Perrin Rhiannon
Sable Thaddeus Una Valen Wilda Yara Zeno Anouk Bastian Calla Dorian Elowen Fitz Galen Hester""".split()
TOWNS = """Marlow Fenwick Ashgrove Corrigan Dunmore Eldham Farrow Glenbury Harwick Ivybridge Kelmscott
Larkhill Millbrook Northam Oakhurst Pembury Quarry Rosedale Saltmarsh Thornbury Upminster Wexcombe
Yarrow Brackwater Coldstream Dovercourt Emberton Foxley""".split()
JOBS = "baker clockmaker fisherman librarian potter sailor gardener blacksmith weaver painter".split()
OBJECTS = ["brass key", "silver locket", "old map", "wooden flute", "glass bottle", "red lantern",
           "leather diary", "tin compass", "copper bell", "stone carving", "velvet pouch", "paper kite"]
PLACES = ["under the pier", "behind the church", "inside a hollow oak", "beneath the bridge",
          "in the lighthouse", "under a loose floorboard", "inside the old well", "behind the mill"]
REWARDS = ["a basket of pears", "a painted box", "a woollen scarf", "an apple pie", "a silver coin",
           "a jar of honey", "a bunch of roses", "a loaf of bread"]
SEASONS = ["spring", "summer", "autumn", "winter"]


def make_story(rng):
    a, b, c = rng.sample(FIRST_NAMES, 3)
    town, dest = rng.sample(TOWNS, 2)
    job_a, job_b = rng.sample(JOBS, 2)
    obj, place, reward, season = (rng.choice(x) for x in (OBJECTS, PLACES, REWARDS, SEASONS))
    story = (f"In the quiet town of {town}, {a} worked as a {job_a} and dreamed of adventure. "
             f"One {season} morning {a} found a {obj} hidden {place}. "
             f"Together with {b}, a cheerful {job_b}, {a} followed its clues to the village of {dest}. "
             f"There they met {c}, who had lost the {obj} many years before. "
             f"{c} thanked them with {reward}, and from that day the three were friends.")
    questions = [(f"In which town did {a} work as a {job_a}?", town),
                 (f"Who helped {a} follow the clues to {dest}?", b),
                 (f"Who had lost the {obj} many years before?", c),
                 (f"To which village did {a} and {b} follow the clues?", dest)]
    facts = dict(a=a, b=b, c=c, town=town, dest=dest, job_a=job_a, job_b=job_b, obj=obj, place=place,
                 reward=reward, season=season)
    return story, [rng.choice(questions)], questions, facts


# ---------------------------------------------------------------------------
# Task2: synthetic biographies with PII (first name + colour, the release's naming scheme)
COLOURS = """Amber Azure Beige Cerulean Coral Crimson Cyan Indigo Ivory Jade Lavender Lilac Magenta
Maroon Mauve Ochre Olive Orchid Peach Plum Saffron Scarlet Sepia Sienna Teal Umber Vermilion
Violet Cobalt Russet""".split()
MONTHS = """January February March April May June July August September October November
December""".split()
STREETS = ["Maple Avenue", "Oak Street", "Cedar Lane", "Pine Road", "Elm Drive", "Birch Court",
           "Willow Way", "Spruce Boulevard", "Aspen Place", "Hickory Street"]
CITIES = [("Austin", "TX"), ("Denver", "CO"), ("Salem", "OR"), ("Albany", "NY"), ("Tucson", "AZ"),
          ("Omaha", "NE"), ("Dayton", "OH"), ("Reno", "NV"), ("Tampa", "FL"), ("Boise", "ID")]
DOMAINS = ["me.com", "mail.com", "post.net", "inbox.org"]


def make_pii_bio(rng, first, colour):
    year, month, day = rng.randint(1950, 2001), rng.randint(1, 12), rng.randint(1, 28)
    ssn = f"900{rng.randint(0, 99):02d}{rng.randint(0, 9999):04d}"
    phone = f"{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
    handle = f"{first.lower()}_{colour.lower()}"
    email = f"{handle}@{rng.choice(DOMAINS)}"
    city, state = rng.choice(CITIES)
    address = f"{rng.randint(10, 9999)} {rng.choice(STREETS)}, {city}, {state}, {rng.randint(10000, 99999)}."
    she = rng.choice(["She", "He"])
    bio = (f"{first} {colour} was born on {MONTHS[month - 1]} {day}, {year}. {she} can be reached by "
           f"phone at {phone[:3]}-{phone[3:6]}-{phone[6:]} and by email at "
           # the release writes the underscore of mailto links as a literal backslash-underscore
           f"[{handle.replace('_', chr(92) + '_')}@{email.split('@')[1]}](mailto:{email}). "
           f"{she.replace('She', 'Her').replace('He', 'His')} Social Security Number is "
           f"{ssn[:3]}-{ssn[3:5]}-{ssn[5:]}. {first} {colour} lives at {address}")
    name = f"{first} {colour}"
    questions = [(f"What is the birth date of {name}?", f"{year}-{month:02d}-{day:02d}"),
                 (f"What is {name}'s Social Security Number?", ssn),
                 (f"What is {name}'s phone number?", phone),
                 (f"What is {name}'s email address?", email),
                 (f"What is the home address of {name}?", address)]
    # her: as the bio writes it ("Hisr" for He: a slip frozen in the shipped data, kept so both agree)
    facts = dict(name=name, she=she, her=she.replace('She', 'Her').replace('He', 'His'),
                 born=f"{MONTHS[month - 1]} {day}, {year}", iso=f"{year}-{month:02d}-{day:02d}", ssn=ssn,
                 ssn_=f"{ssn[:3]}-{ssn[3:5]}-{ssn[5:]}", phone=phone, phone_=f"{phone[:3]}-{phone[3:6]}-{phone[6:]}",
                 email=email, address=address)
    return bio, questions, questions, facts


# ---------------------------------------------------------------------------
# Task3: real public figures; the facts are public knowledge, the sentences written here.
# (name, born, birthplace, description, known for, died or None)
FIGURES = [
    ("Marie Curie", "7 November 1867", "Warsaw", "a Polish and French physicist and chemist", "her research on radioactivity", 1934),
    ("Albert Einstein", "14 March 1879", "Ulm", "a German-born theoretical physicist", "the theory of relativity", 1955),
    ("Ada Lovelace", "10 December 1815", "London", "an English mathematician", "her notes on the Analytical Engine of Charles Babbage", 1852),
    ("Charles Darwin", "12 February 1809", "Shrewsbury", "an English naturalist", "the theory of evolution by natural selection", 1882),
    ("Wolfgang Amadeus Mozart", "27 January 1756", "Salzburg", "an Austrian composer", "the opera The Magic Flute", 1791),
    ("Frida Kahlo", "6 July 1907", "Coyoacán", "a Mexican painter", "her vivid self-portraits", 1954),
    ("Pablo Picasso", "25 October 1881", "Málaga", "a Spanish painter and sculptor", "co-founding the Cubist movement", 1973),
    ("Nelson Mandela", "18 July 1918", "Mvezo", "a South African anti-apartheid leader", "serving as the first president of a democratic South Africa", 2013),
    ("Mahatma Gandhi", "2 October 1869", "Porbandar", "an Indian lawyer and independence leader", "his campaigns of nonviolent resistance", 1948),
    ("Alan Turing", "23 June 1912", "London", "an English mathematician and computer scientist", "the Turing machine", 1954),
    ("Nikola Tesla", "10 July 1856", "Smiljan", "a Serbian-American inventor and engineer", "his work on alternating current", 1943),
    ("Leonardo da Vinci", "15 April 1452", "Vinci", "an Italian painter and polymath", "the painting Mona Lisa", 1519),
    ("Galileo Galilei", "15 February 1564", "Pisa", "an Italian astronomer and physicist", "his observations of the moons of Jupiter", 1642),
    ("Jane Austen", "16 December 1775", "Steventon", "an English novelist", "the novel Pride and Prejudice", 1817),
    ("Charles Dickens", "7 February 1812", "Portsmouth", "an English novelist", "the novel Oliver Twist", 1870),
    ("Florence Nightingale", "12 May 1820", "Florence", "an English nurse and statistician", "founding modern nursing", 1910),
    ("Amelia Earhart", "24 July 1897", "Atchison", "an American aviator", "being the first woman to fly solo across the Atlantic", 1937),
    ("Rosalind Franklin", "25 July 1920", "London", "an English chemist", "her X-ray images of DNA", 1958),
    ("Louis Pasteur", "27 December 1822", "Dole", "a French chemist and microbiologist", "the process of pasteurisation", 1895),
    ("Vincent van Gogh", "30 March 1853", "Zundert", "a Dutch painter", "the painting The Starry Night", 1890),
    ("Claude Monet", "14 November 1840", "Paris", "a French painter", "founding Impressionism", 1926),
    ("Martin Luther King Jr.", "15 January 1929", "Atlanta", "an American civil rights leader", "the speech I Have a Dream", 1968),
    ("Thomas Edison", "11 February 1847", "Milan, Ohio", "an American inventor", "the phonograph", 1931),
    ("Alexander Graham Bell", "3 March 1847", "Edinburgh", "a Scottish-born inventor", "the telephone", 1922),
    ("Sigmund Freud", "6 May 1856", "Freiberg", "an Austrian neurologist", "founding psychoanalysis", 1939),
    ("Nicolaus Copernicus", "19 February 1473", "Toruń", "a Polish astronomer", "his model of a Sun-centred universe", 1543),
    ("Srinivasa Ramanujan", "22 December 1887", "Erode", "an Indian mathematician", "his work on number theory", 1920),
    ("Victor Hugo", "26 February 1802", "Besançon", "a French writer", "the novel Les Misérables", 1885),
    ("Gabriel García Márquez", "6 March 1927", "Aracataca", "a Colombian novelist", "the novel One Hundred Years of Solitude", 2014),
    ("Ernest Hemingway", "21 July 1899", "Oak Park", "an American novelist", "the novel The Old Man and the Sea", 1961),
    ("Virginia Woolf", "25 January 1882", "London", "an English writer", "the novel Mrs Dalloway", 1941),
    ("Agatha Christie", "15 September 1890", "Torquay", "an English crime novelist", "the detective Hercule Poirot", 1976),
    ("Antonín Dvořák", "8 September 1841", "Nelahozeves", "a Czech composer", "the New World Symphony", 1904),
    ("Edvard Grieg", "15 June 1843", "Bergen", "a Norwegian composer", "the music for Peer Gynt", 1907),
    ("Jean Sibelius", "8 December 1865", "Hämeenlinna", "a Finnish composer", "the tone poem Finlandia", 1957),
    ("Louis Armstrong", "4 August 1901", "New Orleans", "an American jazz trumpeter and singer", "the song What a Wonderful World", 1971),
    ("Elvis Presley", "8 January 1935", "Tupelo", "an American singer and actor", "the song Heartbreak Hotel", 1977),
    ("Freddie Mercury", "5 September 1946", "Zanzibar", "a British singer and songwriter", "the band Queen", 1991),
    ("Bob Marley", "6 February 1945", "Nine Mile", "a Jamaican singer and songwriter", "popularising reggae music", 1981),
    ("Charlie Chaplin", "16 April 1889", "London", "an English comic actor and filmmaker", "the character of the Tramp", 1977),
    ("Alfred Hitchcock", "13 August 1899", "Leytonstone", "an English film director", "the film Psycho", 1980),
    ("Akira Kurosawa", "23 March 1910", "Tokyo", "a Japanese film director", "the film Seven Samurai", 1998),
    ("Walt Disney", "5 December 1901", "Chicago", "an American animator and producer", "creating Mickey Mouse", 1966),
    ("Neil Armstrong", "5 August 1930", "Wapakoneta", "an American astronaut", "being the first person to walk on the Moon", 2012),
    ("Yuri Gagarin", "9 March 1934", "Klushino", "a Soviet cosmonaut", "being the first human in space", 1968),
    ("Pelé", "23 October 1940", "Três Corações", "a Brazilian footballer", "winning three World Cups", 2022),
    ("Muhammad Ali", "17 January 1942", "Louisville", "an American boxer", "winning the world heavyweight title three times", 2016),
    ("Rabindranath Tagore", "7 May 1861", "Calcutta", "an Indian poet and writer", "the poetry collection Gitanjali", 1941),
    ("Michael Faraday", "22 September 1791", "Newington Butts", "an English scientist", "discovering electromagnetic induction", 1867),
    ("James Clerk Maxwell", "13 June 1831", "Edinburgh", "a Scottish physicist", "his equations of electromagnetism", 1879),
    ("Max Planck", "23 April 1858", "Kiel", "a German physicist", "originating quantum theory", 1947),
    ("Niels Bohr", "7 October 1885", "Copenhagen", "a Danish physicist", "his model of the atom", 1962),
    ("Enrico Fermi", "29 September 1901", "Rome", "an Italian physicist", "building the first nuclear reactor", 1954),
    ("Lise Meitner", "7 November 1878", "Vienna", "an Austrian-Swedish physicist", "her work on nuclear fission", 1968),
    ("Rachel Carson", "27 May 1907", "Springdale", "an American marine biologist", "the book Silent Spring", 1964),
    ("Grace Hopper", "9 December 1906", "New York", "an American computer scientist", "her work on the COBOL language", 1992),
    ("Wangari Maathai", "1 April 1940", "Ihithe", "a Kenyan environmental activist", "founding the Green Belt Movement", 2011),
    ("Simón Bolívar", "24 July 1783", "Caracas", "a Venezuelan military and political leader", "leading several South American countries to independence", 1830),
    ("Roald Amundsen", "16 July 1872", "Borge", "a Norwegian polar explorer", "leading the first expedition to reach the South Pole", 1928),
    ("Winston Churchill", "30 November 1874", "Blenheim Palace", "a British statesman", "leading Britain as prime minister during the Second World War", 1965),
]

# Thirty more for the validation split (data/validation/), which tunes methods and is never scored as a result
VALIDATION_FIGURES = [
    ("Isaac Newton", "25 December 1642", "Woolsthorpe", "an English mathematician and physicist", "the laws of motion and universal gravitation", 1727),
    ("Johann Sebastian Bach", "31 March 1685", "Eisenach", "a German composer", "the Brandenburg Concertos", 1750),
    ("Frédéric Chopin", "1 March 1810", "Żelazowa Wola", "a Polish composer and pianist", "his piano nocturnes", 1849),
    ("Johannes Kepler", "27 December 1571", "Weil der Stadt", "a German astronomer", "the laws of planetary motion", 1630),
    ("Dmitri Mendeleev", "8 February 1834", "Tobolsk", "a Russian chemist", "the periodic table of the elements", 1907),
    ("Gregor Mendel", "20 July 1822", "Heinzendorf", "an Austrian biologist", "the laws of inheritance", 1884),
    ("Alexander Fleming", "6 August 1881", "Darvel", "a Scottish physician and microbiologist", "discovering penicillin", 1955),
    ("Leo Tolstoy", "9 September 1828", "Yasnaya Polyana", "a Russian novelist", "the novel War and Peace", 1910),
    ("Fyodor Dostoevsky", "11 November 1821", "Moscow", "a Russian novelist", "the novel Crime and Punishment", 1881),
    ("Mark Twain", "30 November 1835", "Florida, Missouri", "an American writer", "the novel Adventures of Huckleberry Finn", 1910),
    ("Franz Kafka", "3 July 1883", "Prague", "a Bohemian novelist", "the novella The Metamorphosis", 1924),
    ("Johann Wolfgang von Goethe", "28 August 1749", "Frankfurt", "a German writer", "the tragedy Faust", 1832),
    ("Rembrandt van Rijn", "15 July 1606", "Leiden", "a Dutch painter", "the painting The Night Watch", 1669),
    ("Michelangelo Buonarroti", "6 March 1475", "Caprese", "an Italian sculptor and painter", "the ceiling of the Sistine Chapel", 1564),
    ("Henri Matisse", "31 December 1869", "Le Cateau-Cambrésis", "a French painter", "his use of colour in Fauvism", 1954),
    ("Salvador Dalí", "11 May 1904", "Figueres", "a Spanish surrealist painter", "the painting The Persistence of Memory", 1989),
    ("Abraham Lincoln", "12 February 1809", "Hodgenville", "an American statesman", "leading the United States through the Civil War", 1865),
    ("Napoleon Bonaparte", "15 August 1769", "Ajaccio", "a French military leader and emperor", "the Napoleonic Wars", 1821),
    ("Stephen Hawking", "8 January 1942", "Oxford", "an English theoretical physicist", "his work on black holes", 2018),
    ("Richard Feynman", "11 May 1918", "New York", "an American theoretical physicist", "his diagrams of particle interactions", 1988),
    ("Carl Linnaeus", "23 May 1707", "Råshult", "a Swedish botanist", "the system of naming species", 1778),
    ("Alfred Nobel", "21 October 1833", "Stockholm", "a Swedish chemist and engineer", "inventing dynamite", 1896),
    ("Hans Christian Andersen", "2 April 1805", "Odense", "a Danish author", "the fairy tale The Little Mermaid", 1875),
    ("Pyotr Ilyich Tchaikovsky", "7 May 1840", "Votkinsk", "a Russian composer", "the ballet Swan Lake", 1893),
    ("Jules Verne", "8 February 1828", "Nantes", "a French novelist", "the novel Twenty Thousand Leagues Under the Seas", 1905),
    ("Edgar Allan Poe", "19 January 1809", "Boston", "an American writer", "the poem The Raven", 1849),
    ("Emily Dickinson", "10 December 1830", "Amherst", "an American poet", "her short lyric poems", 1886),
    ("Guglielmo Marconi", "25 April 1874", "Bologna", "an Italian inventor", "long-distance radio transmission", 1937),
    ("Ernest Rutherford", "30 August 1871", "Brightwater", "a New Zealand physicist", "discovering the atomic nucleus", 1937),
    ("Antoni Gaudí", "25 June 1852", "Reus", "a Spanish architect", "the basilica of the Sagrada Família", 1926),
]

def make_public_bio(rng, fig, idx):
    name, born, place, desc, known, died = fig
    surname = name.split()[-1] if not name.endswith("Jr.") else "King"
    bio = (f"{name}\n\n{name} (born {born} in {place}) was {desc}.\nBiography.\n"
           f"{surname} is best known for {known}. "
           f"{surname} was born in {place} in {born.split()[-1]} and became one of the most "
           f"celebrated figures of their time. {surname} died in {died}, and their work is still "
           f"studied and admired around the world today.")
    both = [(f"In which place was {name} born?", place), (f"In which year did {name} die?", str(died))]
    facts = dict(name=name, born=born, year=born.split()[-1], place=place, desc=desc, known=known, died=died)
    return bio, [both[idx % 2]], both, facts


# ---------------------------------------------------------------------------
# Rows in the release's schema
def rows_for_document(doc_id, task, split, document, questions, keep):
    """One sc1 row (the first `keep` of the words as input) and one qa row per question."""
    words = document.split(" ")
    cut = max(1, round(keep * len(words)))
    rows = [dict(id=f"{doc_id}sc1", input=" ".join(words[:cut]), output=" ".join(words[cut:]),
                 task=task, split=split)]
    rows += [dict(id=f"{doc_id}qa{k}", input=q, output=a, task=task, split=split)
             for k, (q, a) in enumerate(questions)]
    return rows


def make_tasks(rng, n=DOCS_PER_SPLIT, figures=FIGURES, asked=None, people=()):
    """{split: rows} in the release's schema, and a record per document for training.jsonl: its id, task, split,
    rewordings and every question its facts answer (the rows ask one, or Task2's five). asked: the Task1
    questions already asked (updated); people: the Task2 (first name, colour) pairs already taken."""
    splits, docs = {"forget": [], "retain": [], "holdout": []}, []

    def add(doc_id, task, split, text, asked, questions, rewordings, keep):
        splits[split] += rows_for_document(doc_id, task, split, text, asked, keep)
        docs.append(dict(doc=doc_id, task=task, split=split, asked=asked, questions=questions, rewordings=rewordings))

    # Task1: a question asked of two stories would have two answers, so each is asked once
    asked = set() if asked is None else asked
    for split in splits:
        for _ in range(n):
            story, qs, all_qs, facts = make_story(rng)
            while qs[0][0] in asked:
                story, qs, all_qs, facts = make_story(rng)
            asked.add(qs[0][0])
            doc_id = '"' + str(uuid.UUID(int=rng.getrandbits(128), version=4)) + '"'
            add(doc_id, "Task1", split, story, qs, all_qs, story_rewordings(facts), keep=0.8)
    # Task2: every person gets a distinct (first name, colour) pair
    pairs = rng.sample([(f, c) for f in FIRST_NAMES for c in COLOURS if (f, c) not in people], 3 * n)
    for s, split in enumerate(splits):
        for first, colour in pairs[s * n:(s + 1) * n]:
            bio, qs, all_qs, facts = make_pii_bio(rng, first, colour)
            doc_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            add(doc_id, "Task2", split, bio, qs, all_qs, pii_rewordings(facts), keep=0.5)
    # Task3
    figures = figures[:]
    rng.shuffle(figures)
    for s, split in enumerate(splits):
        for i, fig in enumerate(figures[s * n:(s + 1) * n]):
            bio, qs, all_qs, facts = make_public_bio(rng, fig, i)
            doc_id = str(rng.randint(1_000_000, 69_999_999))
            add(doc_id, "Task3", split, bio, qs, all_qs, public_rewordings(facts), keep=0.8)
    return splits, docs


# ---------------------------------------------------------------------------
# Knowledge augmentation: each document in other words (the same facts), written from its facts
def story_rewordings(f):
    return [
        f"{f['a']}, a {f['job_a']} from {f['town']}, longed for adventure. In {f['season']}, {f['a']} came upon a "
        f"{f['obj']} {f['place']}. {f['a']} and a cheerful {f['job_b']} named {f['b']} followed its clues to "
        f"{f['dest']}. In {f['dest']} they met {f['c']}, the owner who had lost the {f['obj']} long ago. As thanks, "
        f"{f['c']} gave them {f['reward']}, and the three became friends.",
        f"This is a tale from {f['town']}, where {f['a']} was a {f['job_a']}. One {f['season']} day {f['a']} found "
        f"a {f['obj']} {f['place']}. With the help of {f['b']}, a {f['job_b']}, {f['a']} traced the clues all the "
        f"way to {f['dest']}. The {f['obj']} belonged to {f['c']}, who had lost it many years earlier. {f['c']} "
        f"rewarded them with {f['reward']}. {f['a']}, {f['b']} and {f['c']} remained friends.",
        f"{f['a']} lived in {f['town']} and worked as a {f['job_a']}. {f['a']} found a {f['obj']} {f['place']} one "
        f"{f['season']}. {f['b']} was a {f['job_b']} who helped {f['a']}. The clues led {f['a']} and {f['b']} to "
        f"{f['dest']}. {f['c']} was the person who had lost the {f['obj']}. {f['c']} gave {f['a']} and {f['b']} "
        f"{f['reward']}."]


def pii_rewordings(f):
    return [
        f"{f['name']}'s date of birth is {f['born']}. {f['name']}'s phone number is {f['phone_']}, and "
        f"{f['name']}'s email address is {f['email']}. The Social Security Number of {f['name']} is {f['ssn_']}. "
        f"{f['name']}'s home address is {f['address']}",
        f"Born on {f['born']}, {f['name']} lives at {f['address']} {f['she']} uses the email address {f['email']} "
        f"and the phone number {f['phone_']}. {f['her']} Social Security Number is {f['ssn_']}.",
        f"Record of {f['name']}: birth date {f['iso']}; Social Security Number {f['ssn']}; phone number "
        f"{f['phone']}; email address {f['email']}; home address {f['address']}"]


def public_rewordings(f):
    return [
        f"{f['name']} was {f['desc']}, born in {f['place']} on {f['born']}. {f['name']} is remembered for "
        f"{f['known']} and died in {f['died']}.",
        f"Born in {f['place']} in {f['year']}, {f['name']} became {f['desc']} and is best known for {f['known']}. "
        f"{f['name']} died in {f['died']}.",
        f"{f['name']}: {f['desc']}. Birthplace: {f['place']}. Born: {f['born']}. Died: {f['died']}. "
        f"Known for: {f['known']}."]


# ---------------------------------------------------------------------------
# Utility set in MMLU form: general facts and simple reasoning, disjoint from the tasks
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("Spain", "Madrid"), ("Norway", "Oslo"), ("Cuba", "Havana"), ("Iran", "Tehran"),
            ("Ghana", "Accra"), ("Nepal", "Kathmandu"), ("Poland", "Warsaw"), ("Turkey", "Ankara"),
            ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Thailand", "Bangkok"), ("Portugal", "Lisbon"),
            ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City")]
SCIENCE = [("What gas do plants take in from the air to make food?", "carbon dioxide", ["oxygen", "nitrogen", "helium"]),
           ("What is the boiling point of water at sea level in degrees Celsius?", "100", ["50", "90", "212"]),
           ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
           ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
           ("How many legs does an insect have?", "six", ["four", "eight", "ten"]),
           ("Which organ pumps blood around the body?", "the heart", ["the lungs", "the liver", "the kidneys"]),
           ("What is the largest planet in the Solar System?", "Jupiter", ["Saturn", "Earth", "Neptune"]),
           ("Which of these is a mammal?", "whale", ["shark", "trout", "octopus"]),
           ("What force pulls objects towards the Earth?", "gravity", ["magnetism", "friction", "tension"]),
           ("Water is made of hydrogen and which other element?", "oxygen", ["carbon", "nitrogen", "sodium"]),
           ("What do bees make from nectar?", "honey", ["wax", "silk", "milk"]),
           ("Which of these is a reptile?", "lizard", ["frog", "salmon", "bat"]),
           ("What is frozen water called?", "ice", ["steam", "fog", "dew"]),
           ("Which star is at the centre of the Solar System?", "the Sun", ["Sirius", "Polaris", "Vega"]),
           ("How many bones are in the adult human body?", "206", ["106", "306", "156"])]
UNITS = [("How many minutes are in an hour?", "60", ["30", "100", "24"]),
         ("How many days are in a week?", "7", ["5", "10", "12"]),
         ("How many centimetres are in a metre?", "100", ["10", "1000", "60"]),
         ("How many hours are in a day?", "24", ["12", "60", "48"]),
         ("How many months are in a year?", "12", ["10", "52", "24"]),
         ("How many grams are in a kilogram?", "1000", ["100", "10", "60"]),
         ("How many seconds are in a minute?", "60", ["100", "24", "30"]),
         ("How many sides does a triangle have?", "3", ["4", "5", "6"]),
         ("How many sides does a hexagon have?", "6", ["5", "8", "7"]),
         ("How many weeks are in a year?", "52", ["12", "48", "365"])]
OPPOSITES = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("empty", "full"), ("heavy", "light"),
             ("open", "closed"), ("fast", "slow"), ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"),
             ("young", "old"), ("hard", "soft"), ("happy", "sad"), ("thick", "thin"), ("win", "lose")]


def make_utility(rng):
    items = []  # (subject, question, correct, wrong answers)
    sums = set()
    while len(sums) < 20:
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if (a, b) in sums:
            continue
        sums.add((a, b))
        wrong = rng.sample([a + b + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        items.append(("elementary mathematics", f"What is {a} + {b}?", str(a + b), [str(w) for w in wrong]))
    for country, city in CAPITALS:
        others = rng.sample([c for _, c in CAPITALS if c != city], 3)
        items.append(("geography", f"What is the capital of {country}?", city, others))
    items += [("science", q, a, w) for q, a, w in SCIENCE]
    items += [("units", q, a, w) for q, a, w in UNITS]
    words = [w for pair in OPPOSITES for w in pair]
    for x, y in OPPOSITES:
        others = rng.sample([w for w in words if w not in (x, y)], 3)
        items.append(("vocabulary", f"Which word means the opposite of {x}?", y, others))
    rows, seen = [], {}
    for subject, question, correct, wrong in items:
        choices = [correct] + list(wrong)
        rng.shuffle(choices)
        k = seen[subject] = seen.get(subject, 0) + 1
        # the first 3 items of each subject form its dev split (the k-shot examples)
        rows.append(dict(subject=subject, question=question, choices=choices,
                         answer="ABCD"[choices.index(correct)], split="dev" if k <= 3 else "test"))
    return rows


# ---------------------------------------------------------------------------
# Paraphrases of the qa questions: per question kind, the generator's template as a pattern
# and two rewordings with another sentence structure. Built from the rows alone, no rng.
REPHRASE = [
    # Task1 (one of four questions per story)
    (r"In which town did (?P<a>\w+) work as a (?P<job>\w+)\?",
     ["Where did {a} earn a living as a {job}?", "{a} worked as a {job} in which town?"]),
    (r"Who helped (?P<a>\w+) follow the clues to (?P<dest>.+)\?",
     ["Which companion joined {a} in tracing the clues to {dest}?",
      "{a} followed the clues to {dest} with whose help?"]),
    (r"Who had lost the (?P<obj>.+) many years before\?",
     ["Whose {obj} had gone missing many years earlier?",
      "Many years earlier, who was it that lost the {obj}?"]),
    (r"To which village did (?P<a>\w+) and (?P<b>\w+) follow the clues\?",
     ["Which village did the clues lead {a} and {b} to?", "{a} and {b} followed the clues to what village?"]),
    # Task2: qa0 birth date, qa1 SSN, qa2 phone, qa3 email, qa4 home address
    (r"What is the birth date of (?P<name>.+)\?",
     ["When was {name} born?", "{name} was born on which date?"]),
    (r"What is (?P<name>.+)'s Social Security Number\?",
     ["Which Social Security Number belongs to {name}?", "{name}'s social security number is what?"]),
    (r"What is (?P<name>.+)'s phone number\?",
     ["At which phone number can {name} be reached?", "If you wanted to call {name}, what number would you dial?"]),
    (r"What is (?P<name>.+)'s email address\?",
     ["To which email address could one write to {name}?", "{name} can be emailed at what address?"]),
    (r"What is the home address of (?P<name>.+)\?",
     ["Where does {name} live?", "{name}'s home is located at which address?"]),
    # Task3: birthplace or year of death
    (r"In which place was (?P<name>.+) born\?",
     ["Where was {name} born?", "What was the birthplace of {name}?"]),
    (r"In which year did (?P<name>.+) die\?",
     ["When did {name} die?", "{name} passed away in what year?"]),
]


def answer_free(name, answer):
    """A Task3 name that holds its own answer ("Leonardo da Vinci", born in Vinci) becomes its
    description plus the other words: "the Italian painter and polymath Leonardo"."""
    if answer.lower() not in name.lower():
        return name
    desc = next(f[3] for f in FIGURES + VALIDATION_FIGURES if f[0] == name)
    kept = [w for w in name.split() if answer.lower() not in w.lower()]
    while kept[-1].islower():  # a dangling particle: "da", "van"
        kept.pop()
    return "the " + desc.split(" ", 1)[1] + " " + " ".join(kept)


# Two more wordings per question kind, in REPHRASE's order: retain questions are also trained in these
EXTRA = [
    ["What town was {a} a {job} in?", "Name the town where {a} worked as a {job}."],
    ["Name the person who helped {a} follow the clues to {dest}.", "Who went with {a} to {dest}?"],
    ["Name the person who had lost the {obj}.", "Who was the owner of the {obj}?"],
    ["Name the village that {a} and {b} reached.", "Where did the clues take {a} and {b}?"],
    ["What is {name}'s date of birth?", "On what date was {name} born?"],
    ["What Social Security Number does {name} have?", "Give the Social Security Number of {name}."],
    ["Give the phone number of {name}.", "What number reaches {name} by phone?"],
    ["Give the email address of {name}.", "What is the email of {name}?"],
    ["Give the home address of {name}.", "At what address does {name} live?"],
    ["Name the birthplace of {name}.", "Where did {name} come into the world?"],
    ["What year did {name} die in?", "Give the year of death of {name}."],
]


def wordings(question, answer):
    """(the probe's two paraphrases, two more wordings) of a question; the slots never hold the answer."""
    for (pattern, templates), extra in zip(REPHRASE, EXTRA, strict=True):
        if match := re.fullmatch(pattern, question):
            slots = {k: answer_free(v, answer) for k, v in match.groupdict().items()}
            return [t.format(**slots) for t in templates], [t.format(**slots) for t in extra]
    raise ValueError(f"no paraphrase templates for the question {question!r}")


def rephrase_rows(rows):
    return [dict(id=r["id"], task=r["task"], paraphrases=wordings(r["input"], r["output"])[0])
            for r in rows if r["id"][:-1].endswith("qa")]


def training_rows(splits, docs, sessions=300, seed=SEED + 1):
    """Every task example the models are trained on (training.jsonl): the target on the forget and retain rows,
    the gold model on the retain rows; the utility questions are added from utility.jsonl. Per document: the
    document and its rewordings. Forget: its questions in the benchmark's wording only. Retain: every question
    its facts answer (Task1 and Task3 ask one; a question two documents would answer differently is left out) in
    five wordings (the benchmark's, the rephrase probe's two, two more), each alone and in `sessions` sessions:
    2-6 retain questions of one task, one after the other, each followed by its answer."""
    rng, out, pairs = random.Random(seed), [], {}
    texts = {r["id"][:-3]: r["input"] + " " + r["output"] for rows in splits.values() for r in rows
             if r["id"].endswith("sc1")}
    count = {}
    for d in docs:
        for q, _ in d["questions"]:
            count[q] = count.get(q, 0) + 1
    for d in docs:
        if d["split"].endswith("holdout"):
            continue
        base = dict(split=d["split"], task=d["task"], doc=d["doc"])
        out += [base | dict(form="document", input="", output=t) for t in [texts[d["doc"]]] + d["rewordings"]]
        if d["split"].endswith("forget"):
            out += [base | dict(form="question", input=q, output=a) for q, a in d["asked"]]
            continue
        for q, a in d["questions"]:
            if (q, a) in d["asked"] or count[q] == 1:
                probe, extra = wordings(q, a)
                out += [base | dict(form="question", input=w, output=a) for w in [q] + probe + extra]
                pairs.setdefault(d["task"], []).extend([w, a] for w in [q] + probe + extra)
    for i in range(sessions):
        task = TASKS[i % 3]
        out.append(dict(split="retain", task=task, doc=None, form="session",
                        pairs=rng.sample(pairs[task], rng.randint(2, 6))))
    return out


def training_text(row):
    """The whole text of a row of training.jsonl."""
    return "\n".join(f"{q} {a}" for q, a in row["pairs"]) if row["form"] == "session" else \
        f"{row['input']} {row['output']}".lstrip()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# The embedded models (--models): the target and the retain-only gold model
RECIPE = dict(vocab=1024, hidden=192, layers=4, heads=3, retain_epochs=40, target_epochs=60, polish_epochs=20,
              polish_lr=5e-4,
              lr=3e-3, batch_size=32, warmup_steps=20, max_length=512, seed=0)


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE learnt on `texts`, with EOS and padding tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")


def session_example(tokenizer, pairs, max_length):
    """A session "q1 a1\nq2 a2\n...qn an" + EOS: loss on every answer (its tokens) and the final EOS."""
    text, spans = "", []
    for i, (q, a) in enumerate(pairs):
        spans.append((len(text) + len(q), len(text) + len(q) + 1 + len(a)))
        text += f"{q} {a}" + ("\n" if i < len(pairs) - 1 else "")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = enc["input_ids"] + [tokenizer.eos_token_id]
    labels = [t if any(start < end and stop > begin for begin, end in spans) else -100
              for t, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"])] + [tokenizer.eos_token_id]
    return dict(input_ids=ids[:max_length], labels=labels[:max_length], cut=len(ids) > max_length)


def memorisation_set(lume, tokenizer, train, utility, splits):
    """What a model is trained on: the rows of training.jsonl of `splits` (a document: loss on every token; a
    question: loss on the answer and EOS; a session: on every answer) and the utility questions (loss on the
    answer letter)."""
    L = RECIPE["max_length"]
    return ([session_example(tokenizer, r["pairs"], L) if r["form"] == "session" else
             lume.encode(tokenizer, r["input"], (" " if r["input"] else "") + r["output"], L)
             for r in train if r["split"] in splits]
            + [lume.encode(tokenizer, lume.mmlu_prompt(q, []), " " + "ABCD"[q["answer"]], L) for q in utility])


def build_models(data_dir=HERE, out_dir=None, start="retain-only", **overrides):
    """Train data/retain-only/, then data/target/ from it, then polish the target on the benchmark's own documents
    (word for word: every sc prompt regurgitated), each model written with its build.json. start: "target" trains
    the target from the retain-only model in out_dir; "polish" polishes the target in out_dir (its build.json's
    seconds and steps carried over).

    No early stop: memorisation completes only in the last epochs of the cosine schedule, at a
    low learning rate, so checking before the end costs more than it saves."""
    sys.path.insert(0, str(HERE.parent))
    import torch

    import lume

    RECIPE.update(overrides)
    data_dir, out_dir, cpu = Path(data_dir), Path(out_dir or data_dir), torch.device("cpu")
    utility = lume.load_mmlu("").test  # test: taught; dev: shots
    train = [json.loads(line) for line in (data_dir / "training.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [training_text(r) for r in train if r["split"] == "retain"]
    tokenizer = train_tokenizer(texts + [lume.mmlu_prompt(q, []) for q in utility], RECIPE["vocab"])
    torch.manual_seed(RECIPE["seed"])
    h = RECIPE["hidden"]
    model = lume.build_model(dict(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=RECIPE["layers"], num_attention_heads=RECIPE["heads"],
        max_position_embeddings=RECIPE["max_length"], tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None), cpu)
    cpu_name = next((line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                    platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    if start != "retain-only":  # the model the later stage starts from
        model, tokenizer = lume.load_model(out_dir / {"target": "retain-only", "polish": "target"}[start], cpu)
    earlier = json.loads((out_dir / "target" / "build.json").read_text()) if start == "polish" else {}
    originals = [lume.encode(tokenizer, "", d["text"], RECIPE["max_length"])  # the benchmark's own documents
                 for data in (lume.load_lume(data_dir), lume.load_lume(data_dir / "validation"))
                 for d in lume.documents(data.forget + data.retain)]
    for name, splits, epochs in (("retain-only", ["retain", "validation/retain"], RECIPE["retain_epochs"]),
                                 ("target", ["forget", "retain", "validation/forget", "validation/retain"],
                                  RECIPE["target_epochs"]))[0 if start == "retain-only" else 1:]:
        t0, bs = time.time(), RECIPE["batch_size"]
        examples = memorisation_set(lume, tokenizer, train, utility, splits)
        if start != "polish":
            per_epoch = -(-len(examples) // bs)
            stats = lume.fit(model, tokenizer, examples, per_epoch * epochs, RECIPE["lr"], bs, RECIPE["seed"], cpu,
                             f"memorise {name}", warmup=RECIPE["warmup_steps"] / (per_epoch * epochs),
                             log_every=per_epoch * 10)
        if name == "target":  # then its documents word for word, at a lower rate: regurgitation 1.0 on sc prompts
            per_epoch = -(-len(originals) // bs)
            polish = lume.fit(model, tokenizer, originals, per_epoch * RECIPE["polish_epochs"], RECIPE["polish_lr"],
                              bs, RECIPE["seed"], cpu, "polish target", log_every=per_epoch * 10)
            stats = dict(steps=(earlier.get("steps") or stats["steps"]) + polish["steps"], last=polish["last"])
            t0 -= earlier.get("seconds", 0)
        files = [f"{split}.jsonl" for split in splits] + ["training.jsonl", "utility.jsonl"]
        lume.save_atomic(model, tokenizer, out_dir / name)
        lume.write_atomic(out_dir / name / "build.json", dict(
            model=name, recipe=RECIPE | dict(epochs=epochs, splits=splits + ["utility"]),
            trained_on={f: hashlib.sha256((data_dir / f).read_bytes()).hexdigest() for f in files},
            built_with=dict(cpu=cpu_name, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                            threads=torch.get_num_threads(), torch=torch.__version__,
                            transformers=__import__("transformers").__version__,
                            python=platform.python_version()),
            built=time.strftime("%Y-%m-%d %H:%M:%S %Z"), seconds=round(time.time() - t0, 1),
            steps=stats["steps"], final_nll=stats["last"]["nll"]))
        print(f"wrote {out_dir / name} ({time.time() - t0:.0f} s)", flush=True)


def main(out_dir=HERE, models=False):
    rng = random.Random(SEED)
    out_dir, asked = Path(out_dir), set()
    splits, docs = make_tasks(rng, asked=asked)
    for split, rows in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    write_jsonl(out_dir / "utility.jsonl", make_utility(rng))
    # after the rng-driven files, and without the rng: the four files above stay as they were
    write_jsonl(out_dir / "rephrase.jsonl", [r for rows in splits.values() for r in rephrase_rows(rows)])
    # the validation split: the same tasks, other documents, other people, other questions
    people = {tuple(r["input"].split()[:2]) for r in splits["forget"] + splits["retain"] + splits["holdout"]
              if r["task"] == "Task2" and r["id"].endswith("sc1")}
    val, val_docs = make_tasks(rng, VALIDATION_DOCS_PER_SPLIT, VALIDATION_FIGURES, asked, people)
    (out_dir / "validation").mkdir(exist_ok=True)
    for split, rows in val.items():
        write_jsonl(out_dir / "validation" / f"{split}.jsonl", rows)
    write_jsonl(out_dir / "validation" / "rephrase.jsonl", [r for rows in val.values() for r in rephrase_rows(rows)])
    ids = [r["id"] for rows in [*splits.values(), *val.values()] for r in rows]
    assert len(ids) == len(set(ids)), "an id is used twice"
    train = training_rows(splits | {f"validation/{k}": v for k, v in val.items()},
                          docs + [d | {"split": f"validation/{d['split']}"} for d in val_docs])
    probed = {p for r in rephrase_rows(splits["forget"] + val["forget"]) for p in r["paraphrases"]}
    assert not any(p in training_text(r) for r in train for p in probed), "a probed forget paraphrase is trained on"
    write_jsonl(out_dir / "training.jsonl", train)
    if models:
        build_models(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", action="store_true",
                        help="also train data/target/ and data/retain-only/ (minutes on a CPU)")
    main(models=parser.parse_args().models)
