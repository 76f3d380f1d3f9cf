"""Requests that need no expert: everyday questions, and clinical questions outside the suite's skills.

The router must learn the concept "none of my skills is asked for", not a few sentences. So the requests come from
families — a domain (science, travel, …) written by one generator: its own templates and its own fillers. Each
domain has a training family and a held-out family that share no template and no filler, and only the training
families ever reach training data (`tests/test_demo_everyday.py`); the held-out families measure abstention on
requests whose wording the router never saw (`demo/abstention.py`).

    everyday_rows(split, n, seed)          {"instruction", "input": "", "output": "", "experts": [], "meta"}; routing
                                           rows (the stay-out head reads the instruction only)
    outside_rows(split, n, seed, where)    a clinical note with medications, allergies and diagnoses, and a request
                                           about them (none of the six skills); the note in the instruction box
                                           (`where="instruction"`) or in the input box (`"input"`). The output copies
                                           the asked-for note lines: an answer may be incomplete, never invented.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Family:
    """One generator of requests: templates with {slots}, each slot drawn from `fill[slot]`."""

    name: str
    domain: str
    split: str                                  # "train" | "heldout"
    templates: tuple[str, ...]
    fill: dict[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"family {self.name}: split must be one of {SPLITS}, got {self.split!r}")
        for t in self.templates:
            missing = set(re.findall(r"{(\w+)}", t)) - set(self.fill)
            if missing:
                raise ValueError(f"family {self.name}: template {t!r} uses unknown slot(s) {sorted(missing)}")

    def sample(self, rng: random.Random) -> str:
        template = rng.choice(self.templates)
        return template.format(**{k: rng.choice(v) for k, v in self.fill.items() if "{" + k + "}" in template})


def _f(name: str, domain: str, split: str, templates: tuple[str, ...], **fill: tuple[str, ...]) -> Family:
    return Family(name, domain, split, templates, fill)


# ---------------------------------------------------------------- everyday families (one train, one held-out each)
FAMILIES: tuple[Family, ...] = (
    # science
    _f("science_why", "science", "train",
       ("Why does {thing} happen?", "Explain why {thing} happens.", "What causes {thing}?",
        "Can you tell me what makes {thing} happen?", "I always wondered about {thing}. What is behind it?"),
       thing=("thunder", "a rainbow", "rust on iron", "the tide", "an echo", "frost on windows", "a solar eclipse",
              "static electricity", "bread rising", "ice floating on water")),
    _f("science_how", "science", "heldout",
       ("How do {obj} work?", "Give a short explanation of how {obj} function.",
        "In simple terms, what is the principle behind {obj}?", "Describe the science of {obj} for a curious teenager.",
        "What physics makes {obj} possible?", "Could you break down how {obj} operate?"),
       obj=("magnets", "airplane wings", "refrigerators", "solar panels", "microwaves", "volcanoes", "vaccines",
            "batteries", "compasses", "lasers", "telescopes", "earthquakes")),
    # travel
    _f("travel_pack", "travel", "train",
       ("What should I pack for {trip}?", "Make me a packing list for {trip}.", "I'm going on {trip}. What do I bring?",
        "Packing advice for {trip}, please."),
       trip=("a weekend of camping", "a beach holiday", "a ski trip", "a business trip", "a hiking week",
             "a city break in winter", "a long flight")),
    _f("travel_plan", "travel", "heldout",
       ("Plan a {days}-day visit to {city}.", "What are the must-see sights in {city}?",
        "Suggest an itinerary for {days} days in {city}.", "Is {month} a good time to visit {city}?",
        "How would you spend {days} days in {city} on a budget?", "Recommend neighbourhoods to stay in when visiting "
        "{city}."),
       city=("Lisbon", "Kyoto", "Vancouver", "Marrakesh", "Prague", "Buenos Aires", "Edinburgh", "Hanoi", "Istanbul",
             "Cape Town"),
       days=("two", "three", "four", "five"), month=("March", "July", "October", "December")),
    # advice
    _f("advice_habit", "advice", "train",
       ("How can I {goal}?", "Give me tips to {goal}.", "What is the best way to {goal}?",
        "I want to {goal}. Where do I start?"),
       goal=("sleep better", "save money", "learn faster", "stop procrastinating", "drink more water",
             "read more books", "wake up earlier", "keep my desk tidy")),
    _f("advice_career", "advice", "heldout",
       ("Any advice for {situation}?", "What would you recommend for {situation}?",
        "I need guidance on {situation}.", "How should I prepare for {situation}?",
        "What mistakes should I avoid when {situation2}?", "Share a few practical tips for {situation}."),
       situation=("a job interview", "asking for a raise", "my first week at a new job", "a performance review",
                  "changing careers at forty", "working from home", "managing a team for the first time"),
       situation2=("negotiating a salary", "writing a cover letter", "quitting a job", "giving a presentation")),
    # recipes
    _f("recipe_cook", "recipes", "train",
       ("How do I cook {dish}?", "Give me a recipe for {dish}.", "What do I need to make {dish}?",
        "Teach me to make {dish}."),
       dish=("scrambled eggs", "tomato soup", "fried rice", "a simple salad", "banana bread", "porridge",
             "grilled cheese", "lemonade")),
    _f("recipe_bake", "recipes", "heldout",
       ("Write a recipe for {dish} that serves {n}.", "What ingredients go into {dish}?",
        "Walk me through baking {dish} step by step.", "I have {pantry}. What can I cook tonight?",
        "How long should {dish} stay in the oven?", "Suggest a vegetarian version of {dish}."),
       dish=("pancakes", "lasagna", "apple pie", "chocolate chip cookies", "a quiche", "focaccia", "shepherd's pie",
             "carrot cake", "pizza dough"),
       n=("two", "four", "six"), pantry=("eggs, spinach and cheese", "rice, beans and onions",
                                         "pasta, garlic and olive oil", "potatoes, leeks and butter")),
    # arithmetic in words
    _f("arith_times", "arithmetic", "train",
       ("What is {a} times {b}?", "Multiply {a} by {b}.", "How much is {a} multiplied by {b}?",
        "Work out {a} times {b}, please."),
       a=tuple(str(i) for i in range(3, 13)), b=tuple(str(i) for i in range(4, 15))),
    _f("arith_story", "arithmetic", "heldout",
       ("If I buy {a} apples and eat {b}, how many are left?", "A train travels {a} kilometres in {b} hours. What is its "
        "average speed?", "I have {a} euros and spend {b}. How much remains?",
        "Split {a} sweets equally among {b} children: how many does each get?",
        "A box holds {b} pens. How many boxes do {a} pens fill?", "What is {a} divided by {b}, in words?"),
       a=("24", "36", "48", "60", "72", "96", "120"), b=("2", "3", "4", "6")),
    # coding
    _f("code_write", "coding", "train",
       ("Write a Python function that {task}.", "Show me code to {task2}.", "How do I {task2} in JavaScript?",
        "Give me a short script that {task}."),
       task=("reverses a string", "checks if a number is prime", "counts vowels in a word", "sorts a list",
             "finds the largest number in a list"),
       task2=("read a file line by line", "join two lists", "remove duplicates from a list", "parse a date")),
    _f("code_explain", "coding", "heldout",
       ("What does the {lang} keyword `{kw}` do?", "Explain the difference between a list and a tuple in {lang}.",
        "Why would my {lang} program raise a {err}?", "What is recursion? Give an example in {lang}.",
        "How do I write a unit test in {lang}?", "Review this line of {lang}: `{snippet}`"),
       lang=("Java", "Rust", "Go", "C++", "Kotlin", "Ruby"), kw=("yield", "volatile", "async", "const", "match"),
       err=("null pointer error", "stack overflow", "type error", "index out of range error"),
       snippet=("x = [i * 2 for i in range(10)]", "for k, v in d.items(): print(k)", "return a if a > b else b")),
    # translation
    _f("translate_word", "translation", "train",
       ("How do you say '{phrase}' in {lang}?", "Translate '{phrase}' into {lang}.",
        "What is '{phrase}' in {lang}?"),
       phrase=("good morning", "thank you", "where is the station", "I am hungry", "see you tomorrow"),
       lang=("French", "Spanish", "German", "Italian")),
    _f("translate_sentence", "translation", "heldout",
       ("Render this sentence in {lang}: {sentence}", "Could you put the following into {lang}? {sentence}",
        "My {lang} friend needs this translated: {sentence}", "{sentence} — what would that be in {lang}?",
        "Give me the {lang} version of: {sentence}"),
       lang=("Portuguese", "Dutch", "Japanese", "Swedish", "Polish"),
       sentence=("The weather is lovely today.", "Could you help me carry this bag?", "The museum opens at nine.",
                 "I forgot my umbrella at home.", "We are celebrating my sister's birthday.")),
    # chit-chat
    _f("chat_hello", "chit-chat", "train",
       ("Hi! How are you?", "Hello there, what's up?", "Good evening! How has your day been?",
        "Hey, nice to meet you.", "Tell me something about yourself.", "What's your favourite {thing}?"),
       thing=("colour", "season", "animal", "number")),
    _f("chat_opinion", "chit-chat", "heldout",
       ("Do you prefer {a} or {b}?", "I just finished a long week. Any ideas to unwind?",
        "Tell me a fun fact about {topic}.", "What would you name a pet {pet}?",
        "Can you recommend a good {media} for a rainy Sunday?", "Say something encouraging, I'm nervous today."),
       a=("cats", "mountains", "tea", "summer"), b=("dogs", "the sea", "cocoa", "spring"),
       topic=("octopuses", "the moon", "honey bees", "penguins", "the Eiffel Tower"),
       pet=("goldfish", "parrot", "hamster", "tortoise"), media=("book", "film", "board game", "podcast")),
    # writing
    _f("write_short", "writing", "train",
       ("Write a haiku about {topic}.", "Write a limerick about {topic}.", "Compose a two-line poem on {topic}."),
       topic=("autumn leaves", "a sleepy cat", "the ocean", "city lights", "a cup of coffee")),
    _f("write_message", "writing", "heldout",
       ("Draft a polite email to {who} about {what}.", "Write a thank-you note to {who}.",
        "Help me word a text message to {who} saying {what}.", "Compose a short toast for {occasion}.",
        "Write a product description for {product}."),
       who=("my landlord", "a colleague", "my neighbour", "the school"),
       what=("a leaking tap", "moving a meeting", "a noisy party", "a late payment"),
       occasion=("a wedding", "a retirement party", "a graduation"),
       product=("a reusable water bottle", "a wool scarf", "a desk lamp")),
    # general knowledge
    _f("general_who", "general", "train",
       ("Who was {person}?", "Tell me about {person}.", "What is {person} known for?"),
       person=("Marie Curie", "Leonardo da Vinci", "Nelson Mandela", "Ada Lovelace", "Galileo Galilei")),
    _f("general_history", "general", "heldout",
       ("When did {event} happen?", "Summarise the causes of {event}.", "What were the consequences of {event}?",
        "Explain {event} in three sentences.", "Which countries were involved in {event}?"),
       event=("the fall of the Berlin Wall", "the French Revolution", "the first moon landing",
              "the invention of the printing press", "the building of the Great Wall")),
)

# A second training generator per domain (issue 24: many generators): its own templates and fillers, none shared with
# the held-out families (`tests/test_demo_everyday.py`). The first head, trained on one generator per domain, let in a
# third of the held-out general-knowledge and science requests (docs/abstention.md).
FAMILIES += (
    _f("science_what", "science", "train",
       ("What is {concept}?", "Explain {concept} simply.", "Give me a one-paragraph overview of {concept}.",
        "How would you describe {concept} to a child?", "Why is {concept} important?"),
       concept=("photosynthesis", "gravity", "evaporation", "the water cycle", "an atom", "DNA", "black holes",
                "sound waves", "friction", "the speed of light", "plate tectonics", "electric current")),
    _f("travel_transport", "travel", "train",
       ("How do I get from the airport to the centre of {place}?", "Is it cheaper to take the train or fly to {place}?",
        "What documents do I need to travel to {country}?", "Any tips for jet lag after flying to {place}?",
        "Do I need a visa for {country}?"),
       place=("Sydney", "New York", "Madrid", "Mexico City", "Seoul", "Dublin", "Athens"),
       country=("Brazil", "Australia", "India", "Thailand", "the United States", "Morocco")),
    _f("advice_social", "advice", "train",
       ("How do I {social}?", "What is a kind way to {social}?", "Is it rude to {act}?",
        "My friend {problem}. What should I say?"),
       social=("make new friends in a new town", "apologise to a friend", "say no politely",
               "deal with a difficult roommate", "start a conversation at a party"),
       act=("arrive early to a dinner", "text instead of calling", "leave a party without saying goodbye"),
       problem=("forgot my birthday", "is moving away", "keeps cancelling plans")),
    _f("recipe_meal", "recipes", "train",
       ("Suggest a quick {meal} for {who}.", "What goes well with {food}?", "How do I store leftover {food}?",
        "Give me an idea for {meal} tonight."),
       meal=("breakfast", "lunch", "dinner", "snack"),
       who=("a busy weekday", "two hungry kids", "someone who avoids dairy"),
       food=("roast chicken", "rice", "curry", "salmon", "mashed potatoes", "noodles")),
    _f("arith_percent", "arithmetic", "train",
       ("What is {p} percent of {n}?", "Round {x} to the nearest ten.", "Is {n} an even number?",
        "What is the square of {a}?", "Subtract {a} from {n}."),
       p=("10", "25", "50", "20"), n=("80", "200", "140", "360", "90", "75"), x=("47", "123", "88", "2651"),
       a=("7", "9", "12", "15")),
    _f("code_tools", "coding", "train",
       ("Write an SQL query that {query}.", "Which shell command {cmd}?", "How do I install {pkg} with pip?",
        "Write a regular expression that matches {pattern}."),
       query=("counts the rows of a table", "selects the ten newest orders", "joins customers and orders"),
       cmd=("lists the files in a folder", "shows the disk usage", "finds a word in many files"),
       pkg=("numpy", "requests", "flask"), pattern=("an email address", "a phone number", "a postcode")),
    _f("translate_meaning", "translation", "train",
       ("What is the English meaning of '{word}'?", "Is '{word}' formal or informal?",
        "How do I pronounce '{word}'?", "Where does the word '{word}' come from?"),
       word=("merci", "gracias", "danke", "ciao", "arigato", "obrigado", "bonjour")),
    _f("chat_mood", "chit-chat", "train",
       ("I'm bored. Talk to me.", "Tell me a joke about {topic}.", "What did you do today?", "Can you cheer me up?",
        "Do you like {thing}?", "Let's just chat for a bit."),
       topic=("computers", "the weather", "coffee", "mondays"), thing=("music", "rain", "puzzles", "poetry")),
    _f("write_story", "writing", "train",
       ("Write a short story about {subject}.", "Give me a slogan for {shop}.",
        "Write an opening line for a novel about {subject}.", "Suggest a title for a blog post about {subject}."),
       subject=("a lost key", "a dragon who bakes", "time travel", "a lighthouse keeper", "a robot gardener"),
       shop=("a bakery", "a bike shop", "a bookstore", "a flower stall")),
    _f("general_facts", "general", "train",
       ("What is the longest river in {continent}?", "What language is spoken in {country}?",
        "Who wrote {book}?", "Which ocean borders {country}?", "How many people live in {country}?",
        "Who invented the {invention}?"),
       continent=("Africa", "Europe", "Asia", "South America"), country=("Brazil", "Australia", "Mexico", "Chile"),
       book=("Hamlet", "Pride and Prejudice", "Don Quixote", "War and Peace"),
       invention=("telephone", "light bulb", "steam engine", "bicycle")),
)

FAMILY = {f.name: f for f in FAMILIES}


def families(split: str) -> list[Family]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [f for f in FAMILIES if f.split == split]


def everyday_rows(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` requests from the `split` families, the families in turn (distinct requests while there are enough)."""
    rng = random.Random(f"atmoe-demo:{seed}:everyday:{split}")
    fams, rows, seen = families(split), [], set()
    for i in range(n):
        fam = fams[i % len(fams)]
        for _ in range(20):   # a fresh request if the family has one left
            text = fam.sample(rng)
            if text not in seen:
                break
        seen.add(text)
        rows.append({"instruction": text, "input": "", "output": "", "experts": [],
                     "meta": {"family": fam.name, "domain": fam.domain, "split": split}})
    return rows


# ---------------------------------------------------------------- clinical requests outside the skills
# (drug, dose, frequency); (allergen, reaction); diagnoses. Values in the note are the only numbers an answer may use.
DRUGS = (("metformin", "500 mg", "twice daily"), ("lisinopril", "10 mg", "daily"), ("atorvastatin", "40 mg", "at night"),
         ("amlodipine", "5 mg", "daily"), ("furosemide", "40 mg", "every morning"), ("levothyroxine", "75 mcg", "daily"),
         ("apixaban", "5 mg", "twice daily"), ("omeprazole", "20 mg", "daily"), ("sertraline", "50 mg", "daily"),
         ("insulin glargine", "18 units", "at bedtime"), ("salbutamol", "100 mcg", "as needed"),
         ("bisoprolol", "2.5 mg", "daily"))
ALLERGIES = (("penicillin", "rash"), ("sulfa drugs", "hives"), ("latex", "itching"), ("peanuts", "swelling"),
             ("codeine", "nausea"), ("iodine contrast", "wheeze"))
DIAGNOSES = ("type 2 diabetes", "hypertension", "atrial fibrillation", "COPD", "hypothyroidism", "heart failure",
             "chronic kidney disease stage 3", "depression", "asthma", "osteoarthritis")

OUTSIDE_REQUESTS: dict[str, dict[str, tuple[str, ...]]] = {   # topic → split → requests
    "medications": {
        "train": ("List the medications.", "Which drugs is the patient taking?", "Write out the medication list.",
                  "What are the current medications and doses?"),
        "heldout": ("Explain this patient's medications in plain words, as a bulleted list.",
                    "Summarise the drug regimen for the discharge letter.", "What is this person prescribed, and how "
                    "often?", "Put the meds into a table with dose and frequency.")},
    "allergies": {
        "train": ("List the allergies.", "What is the patient allergic to?"),
        "heldout": ("Which substances must we avoid giving, and what reaction did each cause?",
                    "Note the allergy history in one sentence.")},
    "diagnoses": {
        "train": ("List the diagnoses.", "What conditions does the patient have?"),
        "heldout": ("Write the problem list for the handover.", "Which chronic illnesses are documented?")},
}


def outside_note(rng: random.Random) -> tuple[str, dict[str, list[str]]]:
    """A note of medications, allergies and diagnoses, and its lines per topic (what a right answer copies)."""
    age, man = rng.randint(30, 90), rng.random() < 0.5
    drugs = rng.sample(DRUGS, rng.randint(2, 4))
    allergies = rng.sample(ALLERGIES, rng.randint(1, 2))
    dx = rng.sample(DIAGNOSES, rng.randint(1, 3))
    meds = [f"{d} {dose} {freq}" for d, dose, freq in drugs]
    allergy = [f"{a} ({r})" for a, r in allergies]
    text = (f"Note: {age}-year-old {'man' if man else 'woman'} with {', '.join(dx)}. "
            f"Medications: {'; '.join(meds)}. Allergies: {', '.join(allergy)}.")
    return text, {"medications": meds, "allergies": allergy, "diagnoses": dx}


def outside_rows(split: str, n: int, seed: int = 0, where: str = "input") -> list[dict[str, Any]]:
    """`n` clinical requests outside the six skills, the note in the instruction box or the input box."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if where not in ("instruction", "input"):
        raise ValueError(f"where must be 'instruction' or 'input', got {where!r}")
    rng = random.Random(f"atmoe-demo:{seed}:outside:{split}")   # the same notes and requests for either box
    topics, rows = sorted(OUTSIDE_REQUESTS), []
    for i in range(n):
        topic = topics[i % len(topics)]
        request = rng.choice(OUTSIDE_REQUESTS[topic][split])
        text, lines = outside_note(rng)
        instruction, note_input = (f"{request}\n{text}", "") if where == "instruction" else (request, text)
        rows.append({"instruction": instruction, "input": note_input, "output": "\n".join(lines[topic]),
                     "experts": [], "meta": {"topic": topic, "note": text, "where": where, "split": split}})
    return rows
