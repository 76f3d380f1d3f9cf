"""Small tables of real, public medical facts that the synthetic suite draws on.

Everything here is plain data (no randomness, no I/O). Values are common adult
reference ranges and typical doses as found in standard references; they are for a
synthetic benchmark, not clinical use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Drug:
    """A medication: its pharmacological class, what it is for, and typical doses.

    Doses use clinical shorthand (``PO``, ``BID``...) that the ``ABBREVIATIONS`` table
    expands for plain-language answers.
    """

    drug_class: str
    purpose: str
    doses: tuple[str, ...]


@dataclass(frozen=True)
class Lab:
    """A lab test: note abbreviation, unit, adult reference range and display decimals."""

    abbrev: str
    unit: str
    low: float
    high: float
    decimals: int

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"lab range must satisfy low < high, got {self.low}..{self.high}")


DRUGS: dict[str, Drug] = {
    "metformin": Drug("biguanide", "lowers blood sugar", ("500 mg PO BID", "1000 mg PO BID")),
    "insulin glargine": Drug("long-acting insulin", "lowers blood sugar", ("10 units SC QHS", "20 units SC QHS")),
    "lisinopril": Drug("ACE inhibitor", "lowers blood pressure", ("10 mg PO daily", "20 mg PO daily")),
    "losartan": Drug("angiotensin receptor blocker", "lowers blood pressure", ("50 mg PO daily",)),
    "amlodipine": Drug("calcium channel blocker", "lowers blood pressure", ("5 mg PO daily", "10 mg PO daily")),
    "hydrochlorothiazide": Drug("thiazide diuretic", "lowers blood pressure", ("12.5 mg PO daily", "25 mg PO daily")),
    "metoprolol": Drug("beta blocker", "slows the heart and lowers blood pressure", ("25 mg PO BID", "50 mg PO BID")),
    "furosemide": Drug("loop diuretic", "removes extra fluid", ("20 mg PO daily", "40 mg PO daily")),
    "atorvastatin": Drug("statin", "lowers cholesterol", ("20 mg PO QHS", "40 mg PO QHS")),
    "aspirin": Drug("antiplatelet", "prevents blood clots", ("81 mg PO daily",)),
    "clopidogrel": Drug("antiplatelet", "prevents blood clots", ("75 mg PO daily",)),
    "warfarin": Drug("anticoagulant", "prevents blood clots", ("5 mg PO daily",)),
    "apixaban": Drug("anticoagulant", "prevents blood clots", ("5 mg PO BID",)),
    "levothyroxine": Drug("thyroid hormone", "replaces thyroid hormone", ("50 mcg PO daily", "100 mcg PO daily")),
    "omeprazole": Drug("proton pump inhibitor", "reduces stomach acid", ("20 mg PO daily", "40 mg PO daily")),
    "sertraline": Drug("antidepressant", "treats depression and anxiety", ("50 mg PO daily", "100 mg PO daily")),
    "albuterol": Drug("bronchodilator", "opens the airways", ("2 puffs inhaled PRN",)),
    "prednisone": Drug("corticosteroid", "reduces inflammation", ("20 mg PO daily", "40 mg PO daily")),
    "amoxicillin": Drug("penicillin antibiotic", "treats bacterial infections", ("500 mg PO TID",)),
    "gabapentin": Drug("anticonvulsant", "treats nerve pain", ("300 mg PO TID",)),
    "acetaminophen": Drug("analgesic", "relieves pain and fever", ("650 mg PO q6h PRN",)),
}

LABS: dict[str, Lab] = {
    "sodium": Lab("Na", "mmol/L", 135, 145, 0),
    "potassium": Lab("K", "mmol/L", 3.5, 5.0, 1),
    "chloride": Lab("Cl", "mmol/L", 98, 107, 0),
    "bicarbonate": Lab("HCO3", "mmol/L", 22, 29, 0),
    "blood urea nitrogen": Lab("BUN", "mg/dL", 7, 20, 0),
    "creatinine": Lab("Cr", "mg/dL", 0.6, 1.3, 1),
    "glucose": Lab("Glu", "mg/dL", 70, 99, 0),
    "calcium": Lab("Ca", "mg/dL", 8.5, 10.5, 1),
    "magnesium": Lab("Mg", "mg/dL", 1.7, 2.2, 1),
    "hemoglobin": Lab("Hgb", "g/dL", 12.0, 17.5, 1),
    "white blood cell count": Lab("WBC", "x10^9/L", 4.0, 11.0, 1),
    "platelet count": Lab("Plt", "x10^9/L", 150, 400, 0),
}

# Clinical shorthand -> plain words. Matched case-sensitively as whole tokens.
ABBREVIATIONS: dict[str, str] = {
    "HTN": "high blood pressure",
    "T2DM": "type 2 diabetes",
    "CAD": "heart artery disease",
    "CHF": "heart failure",
    "COPD": "chronic lung disease",
    "AFib": "irregular heartbeat",
    "HLD": "high cholesterol",
    "CKD": "long-term kidney disease",
    "GERD": "acid reflux",
    "OSA": "sleep apnea",
    "SOB": "shortness of breath",
    "CP": "chest pain",
    "HA": "headache",
    "hx": "history of",
    "c/o": "complains of",
    "yo": "year-old",
    "w/": "with",
    "PO": "by mouth",
    "SC": "under the skin",
    "BID": "twice a day",
    "TID": "three times a day",
    "QHS": "at bedtime",
    "PRN": "as needed",
    "q6h": "every 6 hours",
    "HR": "heart rate",
    "BP": "blood pressure",
    "SBP": "top blood pressure number",
    "RR": "breathing rate",
    "SpO2": "oxygen level",
    "RA": "room air",
    "Temp": "temperature",
}

# Medical jargon -> lay terms. Matched case-insensitively as whole words.
JARGON: dict[str, str] = {
    "hypertension": "high blood pressure",
    "hyperlipidemia": "high cholesterol",
    "myocardial infarction": "heart attack",
    "cerebrovascular accident": "stroke",
    "atrial fibrillation": "irregular heartbeat",
    "dyspnea": "trouble breathing",
    "syncope": "fainting",
    "pyrexia": "fever",
    "emesis": "vomiting",
    "cephalgia": "headache",
    "pruritus": "itching",
    "edema": "swelling",
    "hematuria": "blood in the urine",
    "dysuria": "painful urination",
    "tachycardia": "fast heartbeat",
    "palpitations": "a pounding heartbeat",
    "epigastric pain": "upper belly pain",
    "arthralgia": "joint pain",
    "myalgia": "muscle aches",
    "diaphoresis": "heavy sweating",
    "rhinorrhea": "a runny nose",
    "hypoxia": "low oxygen",
}

# Presenting complaints as written in a note (an abbreviation or a jargon term).
COMPLAINTS: tuple[str, ...] = (
    "CP", "SOB", "HA", "dyspnea", "syncope", "pyrexia", "emesis", "cephalgia", "pruritus",
    "edema", "hematuria", "dysuria", "palpitations", "epigastric pain", "arthralgia",
    "myalgia", "diaphoresis", "rhinorrhea",
)

# Past history as written in a note.
HISTORY: tuple[str, ...] = (
    "HTN", "T2DM", "CAD", "CHF", "COPD", "AFib", "HLD", "CKD", "GERD", "OSA",
    "hypertension", "hyperlipidemia", "myocardial infarction", "cerebrovascular accident",
    "atrial fibrillation",
)


def lay_term(term: str) -> str:
    """The plain-language wording of a note term (abbreviation or jargon); unknown terms pass through."""
    if term in ABBREVIATIONS:
        return ABBREVIATIONS[term]
    return JARGON.get(term.lower(), term)
