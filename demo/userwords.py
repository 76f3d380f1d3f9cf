"""The stay-out head on wordings a user might type, written for this check (issue 24), in neither the suite nor its
families: in-skill requests, everyday ones and clinical ones outside the skills, the note in the input box.

    python -m demo.userwords [--manifest assets/coadapted/experts.json]      (docs/abstention.md: the figures)
"""

from __future__ import annotations

import argparse

from .config import SHIPPED_MANIFEST

NOTE = "71 yo F with dizziness.\nLabs: Na 129, K 5.9, Hb 10.1.\nVitals: HR 112, SBP 86, SpO2 91, T 38.7."
SKILL: tuple[str, ...] = (
    "Can you pull out her blood results?", "What were the obs? Mark anything worrying as high or low.",
    "Give me the labs with the reference interval for each, bulleted.",
    "Electrolytes and haemoglobin please, flagged.", "Read me the vitals in words a patient's son would get.",
    "Heart rate, BP, sats and temp as a dash list.", "Which of these results are abnormal?",
    "List her labs. For every one, what's the normal range?",
    "Turn the vitals into bullets and say if each is low, normal or high.", "labs pls",
    "Summarise the observations with normal ranges.", "I need the lab numbers written without abbreviations.",
    "Are any of the vital signs out of range? List them all with a verdict.",
    "Bloods, in plain English, as bullets.", "Put each vital on its own line with a hyphen.",
    "What's her sodium and potassium, and are they ok?", "Show the lab panel against reference ranges.",
    "Vitals only, flagged.", "Write out the results from the lab for the family.",
    "Check the vitals and tell me which are high or low.",
)
EVERYDAY: tuple[str, ...] = (
    "Why is the sky blue?", "What's a good name for a golden retriever?", "How do I change a flat tyre?",
    "Recommend three sci-fi novels.", "What's 15% of 80?", "Explain how a mortgage works.",
    "Write a birthday poem for my dad.", "How do I fix a merge conflict in git?",
    "Best way to learn guitar as an adult?", "What is the population of Tokyo?",
    "Translate 'good night' into German.", "How do I make cold brew coffee?", "Tell me about the Roman Empire.",
    "Is it going to rain tomorrow?", "What's the difference between weather and climate?",
    "Help me plan a kid's party.", "How many planets are in the solar system?", "What should I watch tonight?",
    "How do I center a div in CSS?", "What does a normal resting heart rate mean for fitness?",
)
OUTSIDE: tuple[str, ...] = (
    "What antibiotics could treat her pneumonia?", "Is she on any blood thinners?", "What's the likely diagnosis?",
    "Write a discharge summary.", "What dose of paracetamol is safe for her?",
)


def main(argv: list[str] | None = None) -> None:
    from atmoe.model import ATMoE
    from atmoe.train.data import Example
    from atmoe.train.stay_out import kept_out

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=SHIPPED_MANIFEST)
    m = ATMoE.load(p.parse_args(argv).manifest, device="cpu")
    for name, rows, note in (("in-skill", SKILL, NOTE), ("everyday", EVERYDAY, ""), ("clinical outside", OUTSIDE, NOTE)):
        k = kept_out(m, [Example(r, note, None, []) for r in rows]).tolist()
        wrong = [r for r, x in zip(rows, k) if x == (name == "in-skill")]
        print(f"{name}: kept out {sum(k)} of {len(rows)}; {'kept out' if name == 'in-skill' else 'let in'}: {wrong}")


if __name__ == "__main__":
    main()
